"""Comparing two different compiled programs that compute the same float32 math.

XLA orders and fuses a program's float operations as it sees fit, per program and per CPU:
the vector width (AVX2's 8 lanes, AVX-512's 16) changes the order of a reduction's
additions, and the fast-compile settings of the tests (``_xla.py``) change the fusions. Two
programs that compute the same function therefore agree to float32 rounding, not bit for
bit: a scan over a whole chunk and groups of minibatches differed by 1 ulp in 4 of 16
biases on an AMD EPYC (AVX2) and not on an Intel Sapphire Rapids (AVX-512). The suite
asserts bit-for-bit equality only for one executable run on the same inputs (a resumed run,
a streamed and an in-memory run of the host engine's one step executable); the others use
:func:`assert_rounding_close` with a bound stated in units of float32 rounding.
"""

import numpy as np

#: float32's unit roundoff: the largest relative error of one rounded operation.
U = 2.0 ** -24


def float_scale(arrays) -> float:
    """The largest magnitude in ``arrays`` (their floating-point ones): the scale of a state."""
    return max((float(np.max(np.abs(np.asarray(a, np.float64)))) for a in arrays
                if np.issubdtype(np.asarray(a).dtype, np.floating) and np.size(a)), default=0.0)


def scaled_error(a, b, scale=None) -> float:
    """``max |a - b| / scale`` (``scale`` default ``max |b|``; 0 when ``a == b``). Errors of a
    state are measured against the whole state's scale (:func:`float_scale`), as rounding
    errors are: a weight whose true gradient is zero (a convolution's bias before a
    BatchNorm) holds only rounding noise, and no error is small against the noise itself."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    if diff == 0.0:
        return 0.0
    scale = float(np.max(np.abs(b))) if scale is None else float(scale)
    return diff / (scale or 1.0)


def assert_rounding_close(a, b, *, units: float, scale=None, err_msg: str = "") -> float:
    """``max |a - b| <= units * U * scale`` (:func:`scaled_error`); returns the error in
    units of ``U``."""
    assert np.all(np.isfinite(np.asarray(a, np.float64))), f"{err_msg}: not finite"
    err = scaled_error(a, b, scale) / U
    assert err <= units, f"{err_msg}: {err:.1f} units of float32 rounding > {units}"
    return err
