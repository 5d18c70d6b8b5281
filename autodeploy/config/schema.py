"""The experiment config schema (typed, validated by OmegaConf at compose time).

The shape follows the seed's ``ExperimentConfig`` so a YAML written for the reference system
works unchanged: ``model``, ``args`` (the AutoDeploy config), ``prompt``, ``benchmark``,
``logger``, ``yaml_extra``, ``dry_run``; ``server`` (the OpenAI-compatible server) is ours.
OmegaConf 2.3 has no ``Literal``: fields with a closed set of values are plain strings checked by
``validate`` (see ``CHOICES``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

DEFAULT_QUERIES: List[Any] = [
    "How big is the universe? ",
    {"prompt": "In simple words and a single sentence, explain the concept of gravity: "},
    "How to fix slicing in golf? ",
    [{"role": "user", "content": "Name three primary colors."}],
]


@dataclass
class SamplingConfig:
    """``prompt.sp_kwargs``: the SamplingParams used for the prompt run."""

    max_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class PromptConfig:
    # queries are repeated or cut to batch_size; each is a string, {"prompt": str} or chat messages
    batch_size: int = 2
    queries: List[Any] = field(default_factory=lambda: list(DEFAULT_QUERIES))
    sp_kwargs: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class BenchmarkConfig:
    enabled: bool = False
    bs: int = 1
    isl: int = 2048
    osl: int = 128
    num: int = 10
    warmup: int = 2
    results_path: str = "./benchmark_results.json"
    store_results: bool = False
    compare_hf: bool = False  # HF eager and HF static cache + torch.compile on the same prompts (at bs)
    batch_sizes: List[int] = field(default_factory=list)  # more sizes after bs, on the same engine
    jsonl_path: Optional[str] = "benchmark.jsonl"  # a row per batch size; relative = the run folder
    plot: bool = True  # benchmark.png beside results.json (ITL over the run, tok/s vs batch size)
    # isl + osl past the model's max_position_embeddings is an error unless this says it is meant
    allow_past_max_position: bool = False
    # offline: fixed batches through the engine (bs, num, batch_sizes, compare_hf);
    # serve (benchmark=serve): requests through the OpenAI server, as `vllm bench serve` (bench/serve.py)
    kind: str = "offline"
    num_prompts: int = 100  # serve: timed requests (after `warmup` untimed ones)
    request_rate: float = float("inf")  # serve: requests/s, Poisson arrivals; inf = all at once
    max_concurrency: Optional[int] = None  # serve: at most this many requests in flight
    dataset: Optional[str] = None  # serve: prompts from a file (JSON lines) instead of random isl tokens
    url: Optional[str] = None  # serve: a running server's base URL; None = start one on this run's engine
    seed: int = 0  # serve: random prompts and arrival times


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "autodeploy"
    entity: Optional[str] = None
    mode: str = "offline"  # online | offline | disabled
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class ServerConfig:
    """``server``: the OpenAI-compatible HTTP server on the run's engine (``server=openai``)."""

    name: str = "none"  # none = run the prompts / benchmark and exit | openai = serve until SIGTERM
    host: str = "127.0.0.1"  # 0.0.0.0: every interface
    port: int = 8000  # 0 = any free port (the log says which)
    served_model_name: Optional[str] = None  # the model id clients send; None = the run's model
    max_waiting_requests: int = 1024  # requests queued beyond the running batch; one more gets a 503
    api_key: Optional[str] = None  # when set, requests need `Authorization: Bearer <api_key>`
    shutdown_grace_s: float = 30.0  # on SIGTERM/SIGINT: in-flight requests may finish this long, then abort


@dataclass
class AutoDeployArgs:
    """``args``: everything the deployment pipeline and runtime read."""

    # alias of the top-level ``model``; when set it names the model (a local dir or hub id)
    model: Optional[str] = None
    model_factory: str = "AutoModelForCausalLM"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None
    tokenizer_kwargs: Dict[str, Any] = field(default_factory=dict)
    skip_loading_weights: bool = False
    skip_tokenizer_init: bool = False
    world_size: int = 1
    runtime: str = "autodeploy"  # "trtllm" / "demollm" from reference YAMLs run the same engine
    device: str = "auto"  # auto = cuda if available, else cpu
    dtype: str = "auto"  # auto = the checkpoint's dtype (float32 if it names none)
    max_seq_len: int = 512
    max_batch_size: int = 8
    max_num_tokens: Optional[int] = None  # None = max_batch_size * max_seq_len, capped at 8192
    # prompt tokens per step while other requests decode (bounds their inter-token latency); None = no cap
    prefill_chunk_size: Optional[int] = 2048
    # launch each step before the previous one's sampled ids reach the host (hides the host's time
    # per step); None = on with a CUDA device (on the CPU the forward itself runs on the host)
    overlap_scheduler: Optional[bool] = None
    attn_page_size: int = 64
    kv_cache_dtype: str = "auto"
    # shortcuts: None = keep the transform's value; a value overwrites it (see config/resolve.py)
    free_mem_ratio: Optional[float] = None
    cuda_graph_batch_sizes: Optional[List[int]] = None
    attn_backend: Optional[str] = None
    compile_backend: Optional[str] = None
    transforms: Dict[str, Any] = field(default_factory=dict)
    yaml_extra: List[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    model: Optional[str] = None  # a card name (conf/model), a local HF directory or a hub id
    args: AutoDeployArgs = field(default_factory=AutoDeployArgs)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    yaml_extra: List[str] = field(default_factory=list)
    dry_run: bool = False
    # run the pipeline on meta up to and including sharding (one process, no weights), save the plan, exit
    plan_only: bool = False


# Free-form dicts: any key below these paths is accepted at config time (the model config or the
# transform's own typed config validates it later).
FREE_FORM_PATHS = ("args.model_kwargs", "args.tokenizer_kwargs", "args.transforms")

CHOICES = {
    "args.runtime": ("autodeploy", "trtllm", "demollm"),
    "args.device": ("auto", "cpu", "cuda"),
    "args.dtype": ("auto", "float32", "bfloat16", "float16"),
    "args.kv_cache_dtype": ("auto", "float32", "bfloat16", "float16"),
    "logger.name": ("none", "wandb"),
    "logger.mode": ("online", "offline", "disabled"),
    "server.name": ("none", "openai"),
    "benchmark.kind": ("offline", "serve"),
}

# (path, minimum) for integer fields that must be positive / non-negative
MINIMUMS = {
    "args.world_size": 1,
    "args.max_seq_len": 1,
    "args.max_batch_size": 1,
    "args.attn_page_size": 1,
    "args.prefill_chunk_size": 1,
    "prompt.batch_size": 1,
    "benchmark.bs": 1,
    "benchmark.isl": 1,
    "benchmark.osl": 1,
    "benchmark.num": 1,
    "benchmark.warmup": 0,
    "benchmark.num_prompts": 1,
    "benchmark.max_concurrency": 1,
    "server.port": 0,
    "server.max_waiting_requests": 1,
    "server.shutdown_grace_s": 0,
}


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore as ``base_experiment`` (used by conf/config.yaml)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_experiment", node=ExperimentConfig)
