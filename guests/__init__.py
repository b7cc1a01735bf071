"""Guest images: assembly sources, the linker layout, the manifest and the shipped flat binaries (package ``kvmharness.guests``)."""
