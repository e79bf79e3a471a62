"""map2map: neural-network emulators for large gridded fields, on Zarr and Dask."""

__version__ = "0.1.0"
