"""Generated stubs of the `mrl.v1` package (see `python -m mrl.proto.generate`)."""
