"""Rasters and labels to chunked Zarr tile stores."""
