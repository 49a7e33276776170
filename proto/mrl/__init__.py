"""Protobuf package `mrl`: versioned wire contracts live in subpackages (`v1`)."""
