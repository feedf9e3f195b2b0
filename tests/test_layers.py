"""lite.layers.projection (the linear layers' product, with its own gradient on CPU) against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lite.layers import projection

STANDARD = (((2,), (0,)), ((), ()))


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_projection_value_and_gradients_match_numpy(dtype, tolerance):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 7)).astype(np.float32)
    kernel = rng.normal(size=(7, 4)).astype(np.float32)
    cotangent = rng.normal(size=(3, 5, 4)).astype(np.float32)

    def loss(x, kernel):
        return jnp.sum(projection(x, kernel, STANDARD).astype(jnp.float32) * cotangent)

    value, (d_x, d_kernel) = jax.jit(jax.value_and_grad(loss, (0, 1)))(jnp.asarray(x, dtype), jnp.asarray(kernel, dtype))
    x, kernel = (np.asarray(jnp.asarray(a, dtype), np.float32) for a in (x, kernel))  # the rounded inputs
    np.testing.assert_allclose(float(value), np.sum((x @ kernel) * cotangent), rtol=tolerance, atol=tolerance)
    assert d_x.dtype == dtype and d_kernel.dtype == dtype
    np.testing.assert_allclose(np.asarray(d_x, np.float32), cotangent @ kernel.T, rtol=tolerance, atol=tolerance * 10)
    np.testing.assert_allclose(np.asarray(d_kernel, np.float32), x.reshape(-1, 7).T @ cotangent.reshape(-1, 4),
                               rtol=tolerance, atol=tolerance * 10)


def test_projection_on_cpu_materialises_the_transposed_activations_for_the_kernel_gradient():
    x, kernel = jnp.ones((2, 8, 16)), jnp.ones((16, 32))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(projection(x, k, STANDARD)), (0, 1)))
    assert "opt-barrier" in grad.lower(x, kernel).as_text(dialect="hlo")
