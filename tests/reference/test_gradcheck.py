"""The numerical-gradient helpers the other tests rely on."""

import numpy as np
import pytest

from bnlab.reference import numerical_gradient, relative_error


def test_numerical_gradient_of_known_function():
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    dout = np.array([[1.0, 2.0], [-1.0, 0.5]])
    grad = numerical_gradient(lambda v: v**3, x.copy(), dout)
    np.testing.assert_allclose(grad, 3 * x**2 * dout, rtol=1e-8)


def test_numerical_gradient_restores_input():
    x = np.arange(6.0).reshape(2, 3)
    before = x.copy()
    numerical_gradient(np.sin, x, np.ones_like(x))
    np.testing.assert_array_equal(x, before)


def test_relative_error():
    assert relative_error(np.ones(3), np.ones(3)) == 0.0
    assert relative_error(np.array([1.0]), np.array([3.0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="expected equal shapes"):
        relative_error(np.ones(2), np.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        numerical_gradient(np.sin, np.arange(3), np.ones(3))
