"""x @ weight.T for decoding steps: one row is a parallel multiply-and-sum on the CPU, more rows are F.linear.

matvec(x [..., in], weight [out, in]) -> [..., out]
"""

from attamba.ops.matvec.fast import matvec
from attamba.ops.matvec.naive import matvec_naive

__all__ = ["matvec", "matvec_naive"]
