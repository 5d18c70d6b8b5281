"""Export patch registry: selection per model type, explicit selection, and why the Mamba patch exists."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from autodeploy.export import patches as registry
from autodeploy.export.export import ExportError, export_to_gm
from autodeploy.models.factory import ModelFactory


def test_patches_are_selected_by_model_type(exported_models):
    assert "mamba2_ssm_ops" in exported_models["tiny_hybrid"][1].meta["autodeploy_export"]["patches"]
    for name in ("tiny_llama", "tiny_mixtral"):
        applied = exported_models[name][1].meta["autodeploy_export"]["patches"]
        assert "mamba2_ssm_ops" not in applied and "histc_float_input" in applied


def test_unknown_patch_name():
    with pytest.raises(KeyError, match=r"unknown export patch 'mamba_ssm_ops'.*did you mean mamba2_ssm_ops"):
        registry.get_patch("mamba_ssm_ops")


def test_register_and_apply_a_patch():
    calls = []

    @registry.register_patch("_test_only_patch", model_types=("llama",))
    @contextlib.contextmanager
    def _patch(model):
        calls.append("enter")
        yield
        calls.append("exit")

    try:
        llama = ModelFactory("tiny_llama").build_model()
        mixtral = ModelFactory("tiny_mixtral").build_model()
        assert "_test_only_patch" in [p.name for p in registry.patches_for(llama)]
        assert "_test_only_patch" not in [p.name for p in registry.patches_for(mixtral)]
        with registry.export_patches(mixtral, names=["_test_only_patch"]) as applied:
            assert applied == ["_test_only_patch"] and calls == ["enter"]
        assert calls == ["enter", "exit"]
        with pytest.raises(ValueError, match="registered twice"):
            registry.register_patch("_test_only_patch")(lambda model: contextlib.nullcontext())
    finally:
        registry.PATCHES.pop("_test_only_patch", None)


def test_hybrid_without_the_mamba_patch_cannot_keep_seq_dynamic():
    # HF's chunked scan pads seq to a multiple of chunk_size, which specializes seq at export
    model = ModelFactory("tiny_hybrid").build_model()
    with pytest.raises(ExportError, match=r"torch.export failed for NemotronHForCausalLM"):
        export_to_gm(model, max_batch_size=2, max_seq_len=64, patches=["histc_float_input"])


def test_histc_patch_makes_meta_exported_moe_run_on_cpu():
    # exported on meta, HF's MoE would take its non-CPU branch (int histc), which has no CPU kernel
    from autodeploy.export.patches import patches_for

    factory = ModelFactory("tiny_mixtral")
    model = factory.build_model()
    others = [p.name for p in patches_for(model) if p.name != "histc_float_input"]
    gm = export_to_gm(model, max_batch_size=2, max_seq_len=32, patches=others)
    factory.load_weights(gm, "cpu")
    with pytest.raises(RuntimeError, match="histogram_cpu"):
        gm(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]))


@pytest.mark.parametrize("model_type,kwargs", [
    ("bamba", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                   mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=2, mamba_chunk_size=16,
                   attn_layer_indices=[1], mamba_expand=2)),
    ("mamba2", dict(num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, n_groups=2, chunk_size=16, expand=2)),
])
def test_other_mamba2_families_export_exactly(model_type, kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=64, use_cache=False, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    gm = export_to_gm(model, max_batch_size=4, max_seq_len=64)
    assert "mamba2_ssm_ops" in gm.meta["autodeploy_export"]["patches"]
    for batch, seq in [(1, 1), (2, 7), (1, 33)]:
        ids, pos = torch.randint(0, 256, (batch, seq)), torch.arange(seq).repeat(batch, 1)
        with torch.no_grad():
            ours, ref = gm(ids, pos), model(input_ids=ids, position_ids=pos, use_cache=False).logits
        # bit-exact where our scan ports this transformers' own order of operations (5.24);
        # older transformers sum in another order, so only rounding may differ there
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_scalar_tensor_literals_keep_their_value(device):
    # exported on meta, torch.tensor(0.5, device=...) would become a lifted constant without a value
    class Where(torch.nn.Module):
        def forward(self, input_ids, position_ids):
            return torch.where(position_ids > 0, torch.tensor(0.5, device=input_ids.device), -1.0)

    ids = torch.zeros(2, 4, dtype=torch.long, device=device)
    pos = torch.arange(4, device=device).repeat(2, 1)
    with registry.export_patches(Where(), names=["scalar_tensor_literals"]):
        gm = torch.export.export(Where(), (ids, pos), strict=False).module()
    fulls = [n for n in gm.graph.nodes if n.target is torch.ops.aten.full.default]
    lifted = [n for n in gm.graph.nodes if n.op == "get_attr"]
    if device == "meta":
        assert len(fulls) == 1 and fulls[0].args[1] == 0.5 and not lifted
        from autodeploy.models.materialize import replace_device_literals

        replace_device_literals(gm, torch.device("cpu"))
        for node in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
            gm.graph.erase_node(node)  # export's input checks would insist on meta inputs
        gm.recompile()
    else:  # elsewhere the constant has its value (and .item() on it keeps working)
        assert not fulls and len(lifted) == 1
    out = gm(torch.zeros(2, 4, dtype=torch.long), torch.arange(4).repeat(2, 1))
    assert out.tolist() == [[-1.0, 0.5, 0.5, 0.5]] * 2 and out.dtype == torch.float32


def test_list_indices_exported_on_meta_keep_their_values():
    # torch lifts the index tensor of x[..., [-2]] into a constant; on meta it would have no value
    class SplitHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 12)

        def forward(self, input_ids, position_ids):
            qkv = self.emb(input_ids).view(*input_ids.shape, 3, 4)
            return qkv[:, :, [-2]] + qkv[:, :, [0, 2]].sum(2, keepdim=True)

    with torch.device("meta"):
        model = SplitHeads()
        ids, pos = torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)

    def constants(names):
        with registry.export_patches(model, names=names):
            gm = torch.export.export(model, (ids, pos), strict=False).module()
        return [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr" and "lifted" in n.target]

    assert {c.device.type for c in constants([])} == {"meta"}
    assert [c.tolist() for c in constants(["list_index_literals"])] == [[-2], [0, 2]]
    assert "__getitem__" not in torch.Tensor.__dict__  # restored


def _fake_modeling(monkeypatch, **helpers):
    import sys
    import types

    modeling = types.ModuleType("_fake_modeling_ssm")
    for name, fn in helpers.items():
        setattr(modeling, name, fn)
    monkeypatch.setitem(sys.modules, modeling.__name__, modeling)
    return modeling, type("Mixer", (torch.nn.Module,), {"__module__": modeling.__name__})


def _as_func_module(fn):
    """What the ``kernels`` package makes of a hub-kernel function (transformers >= 5.25): a module whose
    forward closes over a ``functools.wraps`` wrapper of the function."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs)

    class Func(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return wrapped(*args, **kwargs)

    return Func()


def test_ssm_helper_ops_recognises_helpers_beneath_wrappers(monkeypatch):
    from autodeploy.export.patches import ssm_helpers

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        raise AssertionError("swapped during export")

    def mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
        raise AssertionError("swapped during export")

    wrapped_conv, wrapped_scan = _as_func_module(causal_conv1d_fn), _as_func_module(mamba_selective_scan)
    modeling, mixer = _fake_modeling(monkeypatch, causal_conv1d_fn=wrapped_conv, mamba_selective_scan=wrapped_scan)
    with registry.export_patches(torch.nn.Sequential(mixer()), names=["ssm_helper_ops"]):
        assert modeling.causal_conv1d_fn is ssm_helpers.causal_conv1d_as_op
        assert modeling.mamba_selective_scan is ssm_helpers.mamba_selective_scan_as_op
    assert modeling.causal_conv1d_fn is wrapped_conv and modeling.mamba_selective_scan is wrapped_scan


def test_ssm_helper_ops_with_another_signature_is_one_clear_error(monkeypatch):
    import transformers

    from autodeploy.config.errors import UserError

    def mamba2_chunk_scan(x, dt, A, B, C, chunk_size):  # not the signature the patch reproduces
        raise AssertionError("never called")

    modeling, mixer = _fake_modeling(monkeypatch, mamba2_chunk_scan=_as_func_module(mamba2_chunk_scan))
    model = torch.nn.Sequential(mixer())
    model.config = types.SimpleNamespace(model_type="fake_ssm")
    with pytest.raises(UserError) as info:
        with registry.export_patches(model, names=["ssm_helper_ops"]):
            pass
    message = str(info.value)
    assert "\n" not in message
    for part in ("fake_ssm", "_fake_modeling_ssm.mamba2_chunk_scan", "(x, dt, A, B, C, chunk_size)",
                 f"transformers {transformers.__version__}"):
        assert part in message, (part, message)
    assert modeling.mamba2_chunk_scan.forward is not None  # left in place


def test_ssm_helpers_refuse_cache_state_at_export():
    from autodeploy.export.patches.ssm_helpers import mamba2_chunk_scan_as_op, mamba_selective_scan_as_op

    x = torch.zeros(1, 3, 2, 4)
    with pytest.raises(RuntimeError, match=r"mamba2_chunk_scan called with \['initial_states'\]"):
        mamba2_chunk_scan_as_op(x, x[..., 0], x[0, 0, :, 0], x, x, 4, initial_states=torch.zeros(1, 2, 4, 4))
    with pytest.raises(RuntimeError, match=r"mamba_selective_scan called with \['return_last_state'\]"):
        mamba_selective_scan_as_op(x[0], x[0], x[0, 0], x[0], x[0], return_last_state=True)


def test_dbrx_experts_with_another_activation_fail_by_name():
    from transformers import DbrxConfig, DbrxForCausalLM

    config = DbrxConfig(d_model=32, n_heads=2, n_layers=1, vocab_size=64, max_seq_len=64, use_cache=False,
                        attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
                        ffn_config=dict(ffn_hidden_size=16, moe_num_experts=2, moe_top_k=1,
                                        ffn_act_fn={"name": "gelu"}))
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    with pytest.raises(ExportError, match="DBRX experts with activation GELUActivation are not supported"):
        export_to_gm(model, max_batch_size=2, max_seq_len=32)
