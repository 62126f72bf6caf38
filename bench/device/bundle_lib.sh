# Sourced by sglang_bundle.sh and gateway_bundle.sh (here, not on the device): what packing a bundle for the GPU
# machine takes, whatever is in it. Its receiving end is receive_bundle.sh.

# download_wheels DIR PACKAGE...: CPython 3.12 manylinux wheels of exactly these packages (no dependencies:
# each bundle lists what the machine lacks), into DIR.
download_wheels() {
    local dir=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dir" "$@"
}

# cut_bundle NAME TAR: TAR cut into parts of 50 MiB in .carry/NAME/ (the parts of an earlier bundle removed),
# with .carry/NAME/manifest ("sha256 parts", what receive_bundle.sh checks). Run from the repository root.
cut_bundle() {
    local name=$1 tar=$2
    mkdir -p ".carry/$name" && rm -f ".carry/$name"/part.*
    split -b 50M -d "$tar" ".carry/$name/part."
    echo "$(sha256sum "$tar" | cut -d' ' -f1) $(ls ".carry/$name"/part.* | wc -l)" > ".carry/$name/manifest"
    echo "bundle: $(du -h "$tar" | cut -f1) in $(ls ".carry/$name"/part.* | wc -l) parts:"; ls ".carry/$name"
}
