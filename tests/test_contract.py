"""The row-group op contract's verifier: a module the passes emit is accepted, and a module that
breaks a rule is refused with the function, the layer and the rule named."""

from __future__ import annotations

import pytest
import tvm
from tvm import te

from relay_passes import contract
from relay_passes.rewrite_row_groups import row_group_func


def _module(func, name="rmsmp_dense_fc1_sp2_4"):
    return tvm.IRModule({name: func})


def _dense(scheme="sp2_4", packed=False, **kw):
    return row_group_func("dense", "fc1", scheme, [4, 32], "uint8", [6, 32], packed=packed, **kw)


def _conv():
    conv = {"strides": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
    return row_group_func("conv2d", "conv1", "fixed_8", [1, 3, 8, 8], "int8", [4, 3, 3, 3], conv=conv)


@pytest.mark.parametrize("func", [_dense(), _dense("fixed_4", packed=True), _dense("sp2_4", packed=True),
                                  _dense("sp2_4", packed=True, sp2_lowering="decode"), _dense("fixed_8"), _conv()],
                         ids=["sp2", "fixed4-packed", "sp2-packed", "sp2-decode", "fixed8", "conv"])
def test_row_group_ops_of_the_passes_are_accepted(func):
    assert contract.verify(_module(func)) is not None


def _broken(func, rule):
    with pytest.raises(contract.ContractError, match=rf"rmsmp_dense_fc1_sp2_4 \(layer (fc1|conv1)\) .* rule '{rule}'"):
        contract.verify(_module(func))


def test_unknown_op_is_refused():
    _broken(_dense().with_attr(contract.OP, "matmul"), "op")


def test_missing_layer_is_refused():
    with pytest.raises(contract.ContractError, match="rule 'layer'"):
        contract.verify(_module(_dense().without_attr(contract.LAYER)))


def test_unregistered_scheme_and_wrong_kind_are_refused():
    _broken(_dense().with_attr(contract.SCHEME, "sp3_9"), "scheme")
    _broken(_dense().with_attr(contract.KIND, "fixed"), "kind")
    _broken(_dense().with_attr(contract.ROW_SCHEMES, ["sp2_4"] * 6), "scheme")  # both forms at once


def test_packed_attribute_needs_four_bit_rows_and_uint8_weights():
    _broken(_dense("fixed_8").with_attr(contract.PACKED, 2), "params")  # int8 [6, 32] weights are not packed bytes
    _broken(_dense("fixed_4", packed=True).with_attr(contract.PACKED, 3), "packed")


def test_sp2_lowering_only_for_packed_sp2_rows():
    _broken(_dense("fixed_4", packed=True).with_attr(contract.SP2_LOWERING, "shift"), "sp2_lowering")
    _broken(_dense("sp2_4", packed=True).with_attr(contract.SP2_LOWERING, "lut"), "sp2_lowering")


def test_conv_needs_its_geometry():
    with pytest.raises(contract.ContractError, match=r"layer conv1\) .* rule 'conv'"):
        contract.verify(_module(_conv().without_attr(contract.CONV)))


def _func_with(params_shapes, op="dense", acc_name="acc"):
    """A hand-built op with the given (name, shape, dtype) parameters and an epilogue."""
    x, w, b, s = (te.placeholder(shape, dtype, name=n) for n, shape, dtype in params_shapes)
    k = te.reduce_axis((0, x.shape[1]), "k")
    acc = te.compute((x.shape[0], w.shape[0]), lambda m, n: te.sum(x[m, k].astype("int32") * w[n, k].astype("int32"),
                                                                  axis=k), name=acc_name)
    out = te.compute(acc.shape, lambda m, n: (acc[m, n] + b[n]).astype("float32") * s[n], name="out")
    func = te.create_prim_func([x, w, b, s, out]).without_attr("global_symbol")
    attrs = {contract.OP: op, contract.LAYER: "fc1", contract.SCHEME: "fixed_8", contract.KIND: "fixed"}
    return func.with_attrs(attrs)


GOOD = [("x", (4, 32), "int8"), ("w", (6, 32), "int8"), ("bias", (6,), "int32"), ("scale", (6,), "float32")]


def test_hand_built_op_that_follows_the_contract_is_accepted():
    contract.verify(_module(_func_with(GOOD)))


@pytest.mark.parametrize("index, replacement, message", [
    (0, ("x", (4, 32), "float32"), r"parameter 0 \(x\) is float32"),
    (2, ("bias", (6,), "float32"), r"parameter 2 \(bias\) is float32"),
    (3, ("scale", (5,), "float32"), r"scale has 5 entries for 6 rows"),
])
def test_wrong_parameters_are_refused_naming_the_parameter(index, replacement, message):
    params = list(GOOD)
    params[index] = replacement
    with pytest.raises(contract.ContractError, match=message):
        contract.verify(_module(_func_with(params)))


def test_missing_acc_block_is_refused():
    with pytest.raises(contract.ContractError, match="rule 'blocks': no block named 'acc'"):
        contract.verify(_module(_func_with(GOOD, acc_name="sums")))


def test_pipeline_runs_the_verifier(monkeypatch):
    """The pipeline refuses a module a pass broke, before any schedule runs."""
    import torch

    import tvm_rmsmp as rmsmp
    from relay_passes import PackFourBitRows

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    q = rmsmp.quantize(model, rmsmp.RMSMPConfig(assign="variance"), [torch.randn(32, 16)])
    original = PackFourBitRows.__call__

    def breaking(self, mod):
        mod = original(self, mod)
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and contract.SCHEME in func.attrs:
                mod[gv] = func.with_attr(contract.KIND, "nonsense")
        return mod

    monkeypatch.setattr(PackFourBitRows, "__call__", breaking)
    with pytest.raises(contract.ContractError, match=r"layer 0\) .* rule 'kind'"):
        rmsmp.compile(q, (torch.zeros(2, 16),))


def test_accumulator_bound_is_checked_against_k():
    """int32 sums: K * 255 * 127 for uint8 activations and Fixed-8 rows (levels -127..127) must fit int32."""
    k_max = (2**31 - 1) // (255 * 127)  # 66311
    ok = row_group_func("dense", "fc1", "fixed_8", [1, k_max], "uint8", [2, k_max])
    contract.verify(_module(ok))
    too_big = row_group_func("dense", "fc1", "fixed_8", [1, k_max + 1], "uint8", [2, k_max + 1])
    with pytest.raises(contract.ContractError, match=rf"rule 'acc_bound': {k_max + 1} products .* up to 255 .* 127"):
        contract.verify(_module(too_big))
