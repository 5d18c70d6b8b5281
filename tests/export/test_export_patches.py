"""Export patch registry: selection per model type, explicit selection, and why the Mamba patch exists."""

from __future__ import annotations

import contextlib

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
