"""Number formats, the quantizer, the Random Hadamard Transform and training recipes."""
from .formats import FORMATS, FP4Format, make_format
from .grids import E2M1, INT4, Grid, get_grid
from .hadamard import RHT
from .quantize import QuantizedTensor, fake_quantize, pack_codes, quantize, unpack_codes

__all__ = ["FORMATS", "FP4Format", "make_format", "E2M1", "INT4", "Grid", "get_grid", "RHT",
           "QuantizedTensor", "fake_quantize", "pack_codes", "quantize", "unpack_codes"]
