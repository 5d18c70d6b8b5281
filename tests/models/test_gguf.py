"""GGUF checkpoints: config, tokenizer and weights from one file, every type gguf can dequantize,
only each rank's slices, clear one-line errors.

The files are written here with the ``gguf`` package's writer and quantizers, from tiny HF models;
the reference for each loaded weight is gguf's own dequantization of what was written (for F32,
the model's weights themselves), and the reference for a run is HF transformers on those weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import llama_cpp_permute, quant_byte_shape, torch_model, write_gguf, write_raw_tensor

from autodeploy.config.errors import UserError
from autodeploy.models.factory import ModelFactory, resolve_model
from autodeploy.models.gguf import GGUFError, dequantizable, open_gguf

ROOT = Path(__file__).resolve().parents[2]
MODEL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # the ones gguf can also write


def _all_dequantizable():
    from gguf import GGMLQuantizationType

    return [t.name for t in GGMLQuantizationType if dequantizable(t)]


def _reference(values: np.ndarray, qtype: str) -> torch.Tensor:
    """What a GGUF reader must return for ``values`` written in ``qtype``: gguf's round trip."""
    import gguf
    from gguf.quants import dequantize, quantize

    t = gguf.GGMLQuantizationType[qtype]
    return torch.from_numpy(np.array(dequantize(quantize(values.astype(np.float32), t), t), dtype=np.float32))


def test_every_type_gguf_dequantizes_is_covered():
    types = _all_dequantizable()
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
            "Q6_K"} <= set(types)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes decode to inf and NaN too
@pytest.mark.parametrize("qtype", _all_dequantizable())
def test_slices_of_every_type_equal_gguf_dequantize(qtype, tmp_path):
    """Random bytes in each type: whole tensor, rows, columns off the block grid, and both at once
    equal gguf's dequantization of the whole tensor, sliced."""
    import gguf
    from gguf.quants import dequantize

    t = gguf.GGMLQuantizationType[qtype]
    shape = (8, 512)  # 512: two 256-element K-quant blocks, sixteen 32-element blocks per row
    rng = np.random.default_rng(int(t))
    if qtype in ("F32", "F16"):
        data = rng.standard_normal(shape).astype(np.float32 if qtype == "F32" else np.float16)
    else:
        data = rng.integers(0, 256, quant_byte_shape(shape, t), dtype=np.uint8)
    path = write_raw_tensor(tmp_path / "one.gguf", "blk.0.ffn_up.weight", data, qtype, shape)
    full = torch.from_numpy(np.array(dequantize(data, t), dtype=np.float32))
    ckpt = open_gguf(path).checkpoint(num_layers=1, num_heads=4, num_kv_heads=2)
    key = "model.layers.0.mlp.up_proj.weight"
    assert ckpt.shape(key) == list(shape)
    cases = {
        None: full,
        (0, 2, 7): full[2:7],
        (1, 40, 300): full[:, 40:300],
        ((0, 1, 3), (1, 100, 356)): full[1:3, 100:356],
        ((1, 0, 64), (1, 256, 320)): torch.cat([full[:, :64], full[:, 256:320]], 1),
    }
    for spec, want in cases.items():
        got = ckpt.read(key, spec, dtype=torch.float32)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"{qtype} slice {spec}")


def test_rotary_interleaved_rows_are_restored_per_head(tmp_path):
    """llama.cpp interleaves a llama's q/k rows within each head: reads undo it, a slice of whole
    heads reads only its rows, and a slice that cuts a head still comes out right."""
    rng = np.random.default_rng(0)
    hf = rng.standard_normal((64, 32)).astype(np.float32)  # 4 heads of 16
    path = write_raw_tensor(tmp_path / "q.gguf", "blk.0.attn_q.weight", llama_cpp_permute(hf, 4), "F32", hf.shape)
    ckpt = open_gguf(path).checkpoint(num_layers=1, num_heads=4, num_kv_heads=2)
    key = "model.layers.0.self_attn.q_proj.weight"
    want = torch.from_numpy(hf)
    for spec in [None, (0, 16, 48), (0, 5, 37), ((0, 0, 16), (0, 48, 64)), (1, 3, 20)]:
        ranges = [spec] if spec and isinstance(spec[0], int) else (spec or [(0, 0, 64)])
        expected = torch.cat([want.narrow(d, a, b - a) for d, a, b in ranges], ranges[0][0])
        assert torch.equal(ckpt.read(key, spec), expected), spec


# ----- a tiny llama written in several types ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_ggufs(tmp_path_factory, hf_models):
    from transformers import AutoTokenizer

    from autodeploy.models.tiny import ensure_tiny_model

    model = hf_models["tiny_llama"]
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model("tiny_llama")))
    root = tmp_path_factory.mktemp("gguf")
    paths = {}
    for qtype in MODEL_TYPES:
        (root / qtype).mkdir()
        paths[qtype] = write_gguf(root / qtype / f"tiny-{qtype}.gguf", model, tokenizer, qtype=qtype)
    return model, tokenizer, paths


@pytest.mark.parametrize("qtype", MODEL_TYPES)
def test_tiny_llama_loads_from_gguf(qtype, tiny_llama_ggufs):
    """Config from the metadata equals the model's; every weight equals gguf's dequantization of
    what was written (the model's own for F32), in the run's dtype."""
    model, _, paths = tiny_llama_ggufs
    factory = ModelFactory(str(paths[qtype]))
    assert factory.source.kind == "gguf"
    ours, theirs = factory.config, model.config
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps)
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert factory.dtype == {"F16": torch.float16, "BF16": torch.bfloat16}.get(qtype, torch.float32)
    loaded = factory.build_model("meta")
    factory.load_weights(loaded, "cpu")
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        ref = reference[key].float()
        want = _reference(ref.numpy(), qtype) if ref.dim() == 2 else ref
        assert value.dtype == factory.dtype, key
        assert torch.equal(value, want.to(factory.dtype)), (qtype, key)
        if qtype == "F32":
            assert torch.equal(value, ref), key


def test_dtype_override_and_sharded_slices(tiny_llama_ggufs):
    """args.dtype wins over the file's; a rank's slices equal the same slices of the full load."""
    _, _, paths = tiny_llama_ggufs
    factory = ModelFactory(str(paths["Q4_1"]), dtype="bfloat16")
    full = factory.build_model("meta")
    factory.load_weights(full, "cpu")
    part = factory.build_model("meta")
    q, o = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    with torch.device("meta"):
        part.get_submodule("model.layers.1.self_attn.q_proj").weight = torch.nn.Parameter(torch.empty(32, 64, dtype=torch.bfloat16))
        part.get_submodule("model.layers.1.self_attn.o_proj").weight = torch.nn.Parameter(torch.empty(64, 40, dtype=torch.bfloat16))
    factory.load_weights(part, "cpu", slices={q: (0, 16, 48), o: (1, 8, 48)})
    assert part.get_parameter(q).dtype == torch.bfloat16
    assert torch.equal(part.get_parameter(q), full.get_parameter(q)[16:48])
    assert torch.equal(part.get_parameter(o), full.get_parameter(o)[:, 8:48])


def test_tokenizer_and_chat_template_come_from_the_file(tiny_llama_ggufs):
    _, tokenizer, paths = tiny_llama_ggufs
    ours = ModelFactory(str(paths["Q8_0"])).init_tokenizer()
    assert ours.padding_side == "left"
    for text in ["Hello world, how are you?", "  two spaces\nand a newline", "émigré 123"]:
        assert ours.encode(text) == tokenizer.encode(text), text
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (tokenizer.eos_token_id, tokenizer.bos_token_id,
                                                                         tokenizer.pad_token_id)
    chat = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>Hi\n<|assistant|>"


def test_a_directory_holding_one_gguf_is_the_model(tiny_llama_ggufs, tmp_path):
    _, _, paths = tiny_llama_ggufs
    source = resolve_model(str(paths["Q4_0"].parent))
    assert (source.kind, source.location) == ("gguf", str(paths["Q4_0"]))
    two = tmp_path / "two"
    two.mkdir()
    for q in ("Q4_0", "Q8_0"):
        (two / paths[q].name).symlink_to(paths[q])
    with pytest.raises(UserError, match="holds 2 GGUF files"):
        resolve_model(str(two))


@pytest.mark.parametrize("qtype,world_size", [("Q8_0", 1), ("Q4_1", 2)])
def test_llm_on_gguf_generates_hf_greedy_tokens(qtype, world_size, tiny_llama_ggufs):
    """The whole pipeline on a GGUF (its tokenizer, chat template and weights) gives HF's greedy
    tokens on the same dequantized weights, unsharded and on 2 ranks."""
    from autodeploy import LLM, SamplingParams

    _, _, paths = tiny_llama_ggufs
    factory = ModelFactory(str(paths[qtype]))
    hf = factory.build_model("meta")
    factory.load_weights(hf, "cpu")
    hf.config.use_cache = True
    prompts = ["The quick brown fox", "Once upon a time, in a land far away, there lived",
               [{"role": "user", "content": "Name three colors."}]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with LLM(model=str(paths[qtype]), world_size=world_size, max_seq_len=128) as llm:
        outs = llm.generate(prompts, params)
    for out in outs:
        assert out.error is None
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, pad_token_id=0)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), out.prompt
    chat_ids = outs[2].prompt_token_ids
    assert factory.init_tokenizer().decode(chat_ids) == "<|user|>Name three colors.\n<|assistant|>"


# ----- other architectures ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_families_load(arch, tmp_path):
    from transformers import AutoConfig

    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
    if arch == "qwen3":
        kwargs["head_dim"] = 32  # not hidden / heads: the file's key_length must carry it
    model = torch_model(AutoConfig.for_model(arch, **kwargs))
    path = write_gguf(tmp_path / f"{arch}.gguf", model, qtype="Q8_0")
    factory = ModelFactory(str(path))
    assert factory.model_class_name == type(model).__name__
    def head_dim(cfg):
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    assert head_dim(factory.config) == head_dim(model.config)
    loaded = factory.build_model("meta")
    factory.load_weights(loaded, "cpu")
    for key, value in loaded.state_dict().items():
        ref = model.state_dict()[key]
        want = _reference(ref.numpy(), "Q8_0") if ref.dim() == 2 and ref.shape[-1] % 32 == 0 else ref
        assert torch.equal(value, want), key
    ids = torch.tensor([[3, 17, 99, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0.05, atol=0.05)


# ----- errors -------------------------------------------------------------------------------------


def test_unsupported_tensor_type_is_one_line_before_model_work(tmp_path):
    import gguf

    t = gguf.GGMLQuantizationType.Q8_1
    assert not dequantizable(t)
    data = np.zeros(quant_byte_shape((4, 64), t), np.uint8)
    path = write_raw_tensor(tmp_path / "q81.gguf", "blk.0.ffn_up.weight", data, "Q8_1", (4, 64))
    with pytest.raises(GGUFError, match="cannot dequantize: Q8_1"):
        ModelFactory(str(path))


def test_unsupported_architecture_is_one_line_on_the_command_line(tmp_path):
    data = np.zeros((4, 64), np.float32)
    path = write_raw_tensor(tmp_path / "bloom.gguf", "blk.0.ffn_up.weight", data, "F32", (4, 64), arch="bloom")
    with pytest.raises(GGUFError, match="architecture 'bloom'"):
        ModelFactory(str(path))
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--model", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "GGUF architecture 'bloom'" in errors[0] and "supported: llama" in errors[0], errors


def test_rope_scaling_is_refused(tmp_path, hf_models):
    path = write_gguf(tmp_path / "scaled.gguf", hf_models["tiny_llama"], extra={"llama.rope.scaling.type": "linear"})
    with pytest.raises(GGUFError, match="RoPE scaling"):
        ModelFactory(str(path))
