"""The contraction of every dense layer, as one 2-D matmul with a hand-written gradient.

    y[..., out] = sum_in x[..., in] * kernel[in, out]       (in / out: one or more axes)

is computed as [tokens, in] @ [in, out] on row-major reshapes (free), with

    dx = dy @ kernel^T        dkernel = x^T @ dy      (both already in their final layout)

Why not `lax.dot_general` on the N-D arrays (what nn.Dense / DenseGeneral / einsum do):
XLA:CPU lowers a dot to a 2-D kernel that takes transposed 2-D operands natively, but it
canonicalises an N-D dot_general by physically transposing operands first: a [D, heads,
head_dim] kernel contracted over (heads, head_dim) for dx is copied transposed, every layer,
every step. JAX's own rule also differentiates the kernel as `transpose(dot_general(dy, x))`,
which XLA turns into a transposed copy of dy fused into dy's producers: the whole
element-wise backward chain in front of the dot (norm backward, activation derivative,
residual sums) is evaluated again in transposed order with strided reads. Inside a scanned
layer stack these transposes fuse with the dynamic slice of the stacked residual or weight,
which XLA:CPU emits as a slow loop. On the Flamingo bench the two took about a fifth of the
step's CPU time (docs/performance.md). On TPU/GPU the reshapes are layout-free bitcasts.

A kernel that is not differentiated (frozen weights) gets no kernel gradient: with symbolic
zeros the rule sees which operands are perturbed and skips the other dot (and stores only
the residual the remaining one needs).
"""
import math

import jax
from jax import lax


def contract(x: jax.Array, kernel: jax.Array, num_in: int) -> jax.Array:
  """x [..., *in] . kernel [*in, *out] -> [..., *out] (`num_in` = number of `in` axes)."""
  lead, ins, outs = x.shape[:x.ndim - num_in], kernel.shape[:num_in], kernel.shape[num_in:]
  y = _matmul(x.reshape(-1, math.prod(ins)), kernel.reshape(math.prod(ins), math.prod(outs)))
  return y.reshape(lead + outs)


@jax.custom_vjp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.dot_general(x, kernel, (((1,), (0,)), ((), ())))


def _matmul_fwd(x, kernel):
  y = _matmul(x.value, kernel.value)
  return y, (x.value if kernel.perturbed else None, kernel.value if x.perturbed else None)


def _matmul_bwd(residuals, dy):
  x, kernel = residuals
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None
  dx = None if kernel is None else lax.dot_general(dy, kernel, (((1,), (1,)), ((), ())))
  dkernel = None if x is None else lax.dot_general(x, dy, (((0,), (0,)), ((), ())))
  return dx, dkernel


_matmul.defvjp(_matmul_fwd, _matmul_bwd, symbolic_zeros=True)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` for nn.Dense (its `dot_general=` field): a dense layer's contraction
  (trailing axes of lhs with leading axes of rhs, no batch axes, default precision) goes
  through `contract`; any other contraction is passed to lax unchanged."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  num_in = len(lhs_contract)
  dense = (not lhs_batch and not rhs_batch and precision is None
           and preferred_element_type is None
           and tuple(lhs_contract) == tuple(range(lhs.ndim - num_in, lhs.ndim))
           and tuple(rhs_contract) == tuple(range(num_in)))
  if dense:
    return contract(lhs, rhs, num_in)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)
