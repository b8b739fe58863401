# Shared by bench.sh and ttft.sh (sourced): the binary, the checkpoint, its split, where results
# go, and how to drop a directory's weight files from the page cache.
R=${RABBIT:-$CARGO_TARGET_DIR/release/rabbit}
M=${MODEL:-/tmp/b15}
S=${SPLIT:-/tmp/b15-split}
OUT=${OUT:-/tmp/rabbit-in-place}
mkdir -p $OUT
evict() { python3 -c "
import os,sys,glob
for p in glob.glob(sys.argv[1]+'/*.safetensors'):
    fd=os.open(p,os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.close(fd)
" "$1"; }
# The loading flags of a mode: the split in $S, or in place.
mode_args() { if [ "$1" = split ]; then echo "--split-dir $S"; else echo "--no-split"; fi; }
