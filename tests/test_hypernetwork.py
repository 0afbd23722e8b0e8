"""A1111 hypernetwork files against the published formula (x + mlp(x)·multiplier, A1111's layer order)."""

import pytest
import torch
import torch.nn.functional as F

from sdlite.adapters import hypernetwork
from sdlite.errors import CheckpointError, UnsafePickleError


def lin(g, n_out, n_in):
    return torch.randn(n_out, n_in, generator=g) * n_in ** -0.5, torch.randn(n_out, generator=g) * 0.1


def ln(g, n):
    return 1 + torch.randn(n, generator=g) * 0.1, torch.randn(n, generator=g) * 0.1


def save(path, entries, **info):
    torch.save({**entries, **info}, path)
    return path


def module_state(params):
    return {f"linear.{i}.{n}": t for i, (w, b) in params.items() for n, t in (("weight", w), ("bias", b))}


def test_relu_121_without_output_activation(tmp_path):
    g = torch.Generator().manual_seed(0)
    k = {0: lin(g, 16, 8), 2: lin(g, 8, 16)}
    v = {0: lin(g, 16, 8), 2: lin(g, 8, 16)}
    path = save(tmp_path / "hn.pt", {8: (module_state(k), module_state(v))}, layer_structure=[1, 2, 1],
                activation_func="relu", is_layer_norm=False, use_dropout=False, activate_output=False, name="hn")
    hn = hypernetwork.load(path, multiplier=0.7)
    x = torch.randn(2, 5, 8)
    ck, cv = hypernetwork.apply_hypernetworks([hn], x, x)
    expect = lambda p: x + F.linear(F.relu(F.linear(x, *p[0])), *p[2]) * 0.7
    torch.testing.assert_close(ck, expect(k), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cv, expect(v), rtol=1e-6, atol=1e-6)


def test_layer_norm_dropout_gaps_and_output_activation(tmp_path):
    # layer_structure [1, 2, 2, 1], Hardswish ("swish"), LayerNorm, dropout after the first two: A1111 numbers the
    # Sequential Linear(0) act(1) LN(2) Dropout(3) Linear(4) act(5) LN(6) Dropout(7) Linear(8) act(9) LN(10)
    g = torch.Generator().manual_seed(1)
    p = {0: lin(g, 12, 6), 2: ln(g, 12), 4: lin(g, 12, 12), 6: ln(g, 12), 8: lin(g, 6, 12), 10: ln(g, 6)}
    path = save(tmp_path / "hn.pt", {6: (module_state(p), module_state(p))}, layer_structure=[1, 2, 2, 1],
                activation_func="swish", is_layer_norm=True, use_dropout=True, dropout_structure=[0, 0.3, 0.3, 0],
                activate_output=True)
    hn = hypernetwork.load(path)
    x = torch.randn(3, 6)
    h = x
    for i in (0, 4, 8):
        h = F.layer_norm(F.hardswish(F.linear(h, *p[i])), (p[i + 2][0].shape[0],), *p[i + 2])
    torch.testing.assert_close(hn.layers[6][0](x), x + h, rtol=1e-6, atol=1e-6)


def test_old_linear1_linear2_files_chaining_and_widths(tmp_path):
    g = torch.Generator().manual_seed(2)
    a, b = lin(g, 8, 4), lin(g, 4, 8)
    old = {"linear1.weight": a[0], "linear1.bias": a[1], "linear2.weight": b[0], "linear2.bias": b[1]}
    first = hypernetwork.load(save(tmp_path / "old.pt", {4: (old, old)}))  # no activation, output activation default
    c = {0: lin(g, 8, 4), 1: lin(g, 4, 8)}
    second = hypernetwork.load(save(tmp_path / "second.pt", {4: (module_state(c), module_state(c))},
                                    activation_func="linear"), multiplier=0.5)
    x = torch.randn(2, 3, 4)
    ck, cv = hypernetwork.apply_hypernetworks([first, second], x, x + 1)
    k1 = x + F.linear(F.linear(x, *a), *b)
    torch.testing.assert_close(ck, k1 + F.linear(F.linear(k1, *c[0]), *c[1]) * 0.5, rtol=1e-6, atol=1e-6)
    other = torch.randn(2, 3, 5)  # a width the files do not cover passes through unchanged
    assert hypernetwork.apply_hypernetworks([first, second], other, other)[0] is other


def test_bad_files_are_refused(tmp_path):
    g = torch.Generator().manual_seed(3)
    with pytest.raises(CheckpointError, match="no per-width"):
        hypernetwork.load(save(tmp_path / "x.pt", {"weight": torch.zeros(2)}))
    broken = module_state({0: lin(g, 16, 8), 2: lin(g, 8, 12)})
    with pytest.raises(CheckpointError, match=r"linear.2.weight has shape \[8, 12\], expected \[\*, 16\]"):
        hypernetwork.load(save(tmp_path / "y.pt", {8: (broken, broken)}))
    good = module_state({0: lin(g, 16, 8), 2: lin(g, 8, 16)})
    with pytest.raises(CheckpointError, match="activation 'bogus'"):
        hypernetwork.load(save(tmp_path / "z.pt", {8: (good, good)}, activation_func="bogus"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({8: (good, good), "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError):
        hypernetwork.load(tmp_path / "evil.pt")
