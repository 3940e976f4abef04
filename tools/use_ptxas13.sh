# Sourced by the Gluon probes' device scripts (tools/smem_session.sh, tools/ws_session.sh): unpacks the ptxas 13.4
# carried xz-compressed in .ptxas/ (Triton 3.6's own ptxas 12.8 segfaults on some Gluon kernels; bench/NOTES.md item
# 1c says how to make the file) and points Triton at it.
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.ptxas/ptxas-13.4.xz'), open('/tmp/ptxas13', 'wb'))"
chmod +x /tmp/ptxas13 && export TRITON_PTXAS_PATH=/tmp/ptxas13 && /tmp/ptxas13 --version | tail -1
