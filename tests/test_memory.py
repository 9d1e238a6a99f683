"""lorakit.memory and lorakit.presets: exact parameter counts (PEFT as the oracle), the arithmetic
of every component on a tiny config worked out by hand, the JSON output, bad arguments."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, get_peft_model, memory
from lorakit.cli import main
from lorakit.presets import PRESETS, find_preset, preset_config

# PEFT reads a transformers attribute that warns it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def peft_counts(config, target_modules) -> tuple[int, int]:
    """PEFT's (trainable, total) for LoRA r=8 on a meta-device build."""
    import peft

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=target_modules))
    return peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_counts_equal_peft(name):
    config = preset_config(name)
    counts = memory.count_parameters(config, r=8, target_modules=["q_proj", "v_proj"])
    trainable, total = peft_counts(config, ["q_proj", "v_proj"])
    assert (counts.lora, counts.total + counts.lora) == (trainable, total)
    assert counts.llama_style


def test_all_linear_on_tied_model_equals_peft():
    config = preset_config("SmolLM2-135M")  # tied embeddings: the head is not counted twice
    counts = memory.count_parameters(config, r=8, target_modules="all-linear")
    assert (counts.lora, counts.total + counts.lora) == peft_counts(config, "all-linear")
    assert counts.total == 134_515_008
    assert counts.targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_known_llama2_line(capsys):
    counts = memory.count_parameters(preset_config("Llama-2-7B"), r=8, target_modules=["q_proj", "v_proj"])
    line = "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"
    assert counts.trainable_line == line
    memory.memory("Llama-2-7B", r=8, target_modules=["q_proj", "v_proj"])
    assert line in capsys.readouterr().out


def test_preset_names():
    assert find_preset("llama-2-7b") == "Llama-2-7B"
    assert find_preset("meta-llama/Llama-2-7b-hf") == "Llama-2-7B"
    assert find_preset("GPT-5") is None


# --- the arithmetic, on a tiny config --------------------------------------------------------------

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
# Parameters by hand: embedding 100·32 = 3200; per layer q 32·32 = 1024, k 512, v 512, o 1024,
# gate/up/down 3·2048, two norms 64 -> 9280; x2 layers = 18560; final norm 32; head 3200.
TOTAL = 3200 + 18560 + 32 + 3200  # 24992
# LoRA r=8 on q, v: q A 8·32 + B 32·8 = 512, v A 8·32 + B 16·8 = 384; x2 layers.
LORA = 2 * (512 + 384)  # 1792
# Linear weights QLoRA quantizes (all but the head): 2 x (1024 + 512 + 512 + 1024 + 3·2048)
QUANTIZED = 2 * 9216  # 18432


def tiny_estimate(**kwargs):
    options = dict(r=8, target_modules=["q_proj", "v_proj"], dtype="bf16", optimizer="adamw", batch_size=2, seq_len=16,
                   lora_inputs="saved")
    options.update(kwargs)
    return memory.estimate(LlamaConfig(**TINY), **options)


def test_tiny_counts():
    params = tiny_estimate().params
    assert (params.total, params.lora, params.quantized) == (TOTAL, LORA, QUANTIZED)
    assert params.targets == ["q_proj", "v_proj"]


def test_tiny_weights_gradients_optimizer():
    full, lora, qlora = (tiny_estimate().breakdowns[m] for m in ("full", "lora", "qlora"))
    assert (full.weights, full.gradients, full.optimizer) == (2 * TOTAL, 2 * TOTAL, 8 * TOTAL)
    # LoRA factors are fp32 (4 B) whatever the base dtype
    assert (lora.weights, lora.gradients, lora.optimizer) == (2 * TOTAL + 4 * LORA, 4 * LORA, 8 * LORA)
    # NF4 with double quant: n/2 codes + n/64 one-byte scales + 4 bytes per 256 scales + a 4-byte offset.
    # 1024 -> 512 + 16 + 4 + 4 = 536; 512 -> 256 + 8 + 4 + 4 = 272; 2048 -> 1024 + 32 + 4 + 4 = 1064.
    nf4 = 2 * (2 * 536 + 2 * 272 + 3 * 1064)  # 9616: codes, 8-bit scales, fp32 scale and offset per layer
    assert qlora.weights == nf4 + 2 * (TOTAL - QUANTIZED) + 4 * LORA  # 9616 + 13120 + 7168
    assert tiny_estimate(optimizer="sgd").breakdowns["lora"].optimizer == 0


# T = 2·16 = 32 tokens, d = 2 (bf16), h 32, f 64, a 4, q 32, kv 16.
# Frozen block, one layer: two norms 2·(4·T·h + 4·T) = 2·(4096 + 128) = 8448;
#   SDPA d·T·(2q + 2kv) + 4·T·a = 6144 + 512 = 6656; SwiGLU 3·d·T·f = 12288 -> 27392.
FROZEN = 8448 + 6656 + 12288
# Full FT adds the norms' normalised inputs 2·d·T·h = 4096, the q/k/v and gate/up inputs 2·d·T·h =
# 4096, and down_proj's input d·T·f = 4096.
FULL_LAYER = FROZEN + 3 * 4096  # 39680
FULL_FINAL = 4096 + 128 + 2 * 2048  # final norm (fp32 input, 1/rms, normalised) + lm_head's input
WORKSPACE = 3 * 2 * 32 * 64  # BACKWARD_WORKSPACE_FACTOR (3) · d·T·f
LOGITS = 12 * 32 * 100  # LOGITS_BYTES_PER_VALUE (12) · T · vocab


def test_tiny_activations_and_total():
    est = tiny_estimate()
    full, lora, qlora = (est.breakdowns[m] for m in ("full", "lora", "qlora"))
    assert full.activations == 2 * FULL_LAYER + FULL_FINAL
    assert (full.scratch, full.logits) == (WORKSPACE, LOGITS)
    # LoRA q,v, inputs saved: A·x 2·4·T·r = 2048; each adapter's fp32 copy of its input 2·4·T·h = 8192
    lora_layer = FROZEN + 2048 + 8192
    assert lora.activations == 2 * lora_layer + 4096 + 128
    assert qlora.activations == lora.activations
    assert qlora.scratch == WORKSPACE + 2 * 2048  # + one dequantized weight (the largest, 64 x 32)
    assert full.total == 2 * TOTAL + 8 * TOTAL + max(2 * TOTAL, full.activations + max(LOGITS, WORKSPACE))
    assert lora.total == 2 * TOTAL + 4 * LORA + 8 * LORA + lora.activations + LOGITS
    # inputs rebuilt (lorakit's LoRA Function): only A·x
    rebuilt = tiny_estimate(lora_inputs="rebuilt").breakdowns["lora"]
    assert rebuilt.activations == 2 * (FROZEN + 2048) + 4096 + 128
    # fp32 (d = 4): frozen block 8448 + (4·T·(2q + 2kv) + 512) + 3·4·T·f = 8448 + 12800 + 24576; the
    # adapters' input is the base's own tensor, shared: the q/k/v input once, 4·T·h = 4096
    fp32 = tiny_estimate(dtype="fp32").breakdowns["lora"]
    assert fp32.activations == 2 * (8448 + 12800 + 24576 + 2048 + 4096) + 4096 + 128


def test_tiny_checkpointing_and_eager():
    ckpt = tiny_estimate(gradient_checkpointing=True).breakdowns["full"]
    assert ckpt.activations == 2 * 2048 + FULL_FINAL  # each layer's input d·T·h
    assert ckpt.scratch == FULL_LAYER + WORKSPACE  # one layer recomputed, and its gradients
    # eager: q, k, v repeated 3·d·T·q = 6144, fp32 probabilities and their bf16 copy T·a·s·(4 + 2) =
    # 12288, o_proj's input d·T·q = 2048: 20480 instead of SDPA's 6656
    eager = tiny_estimate(attention="eager").breakdowns["full"]
    assert eager.activations == 2 * (FULL_LAYER - 6656 + 20480) + FULL_FINAL


try:
    from lorakit.layers import autograd as lora_autograd
except ImportError:  # only the plain autograd path exists
    lora_autograd = None


@pytest.fixture
def plain_lora_path():
    """Run LoRA layers through plain autograd (what "saved" models) for the test."""
    if lora_autograd is None:
        yield
        return
    before = lora_autograd.get_lora_path()
    lora_autograd.set_lora_path("plain")
    yield
    lora_autograd.set_lora_path(before)


def saved_bytes(layers: int, dtype, targets, attention: str) -> tuple[int, memory.Shape]:
    """Bytes autograd saves for backward in one forward (parameters excluded)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, attn_implementation=attention, use_cache=False)
    model = LlamaForCausalLM(config).to(dtype).train()
    if targets:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(saved.values()), memory.Shape.from_config(config)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"], "all-linear"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layer_formula_equals_autograds_saved_tensors(plain_lora_path, dtype, d, targets, attention):
    # a 2-layer model saves exactly one layer more than a 1-layer one
    two, shape = saved_bytes(2, dtype, targets, attention)
    one, _ = saved_bytes(1, dtype, targets, attention)
    adapted = frozenset(memory.BLOCK_LINEARS if targets == "all-linear" else targets or [])
    formula = memory.layer_activation_bytes(shape, tokens=32, seq_len=16, dtype_bytes=d, adapted=adapted,
                                            full=targets is None, lora_r=4, lora_inputs="saved", attention=attention)
    assert two - one == formula


def test_storage_formulas():
    assert memory.nf4_bytes(1024, double_quant=False) == 512 + 16 * 4  # 4.5 bits
    n = 2**20
    assert memory.nf4_bytes(n, double_quant=False) * 8 / n == 4.5
    assert memory.nf4_bytes(n, double_quant=True) * 8 / n == pytest.approx(4.127, abs=1e-3)
    # bitsandbytes' 8-bit AdamW: 2 B + 2 fp32 absmax per 256 values; small tensors stay fp32
    assert memory.optimizer_bytes([4096, 100], "adamw8bit") == 2 * 4096 + 8 * 16 + 8 * 100
    assert memory.optimizer_bytes([10, 20], "adamw") == 240
    with pytest.raises(ValueError, match="optimizer"):
        memory.optimizer_bytes([1], "adam")


# --- several processes: per rank -------------------------------------------------------------------

# FSDP's units on TINY: the root's own parameters (embedding 3200, final norm 32, head 3200) and
# each decoder layer (9280, of which 9216 in Linear weights; LoRA q,v 896).
ROOT, LAYER, LAYER_LORA = 6432, 9280, 512 + 384
LAYER_NF4 = 2 * 536 + 2 * 272 + 3 * 1064  # 4808: the layer's Linear weights in NF4 (double quant)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_is_the_same_estimate_whatever_the_strategy(strategy):
    single = tiny_estimate().to_dict()["estimates"]
    assert tiny_estimate(world_size=1, strategy=strategy).to_dict()["estimates"] == single
    assert single["lora"]["base"] == 2 * TOTAL and single["qlora"]["base"] == single["qlora"]["weights"] - 4 * LORA


def test_ddp_keeps_a_whole_replica_per_rank_plus_the_gradient_buckets():
    single, ddp = tiny_estimate().breakdowns, tiny_estimate(world_size=8, strategy="ddp").breakdowns
    for mode in ("full", "lora", "qlora"):
        one, rank = single[mode], ddp[mode]
        assert (rank.weights, rank.base, rank.gradients, rank.optimizer, rank.activations) == (
            one.weights, one.base, one.gradients, one.optimizer, one.activations)
        assert rank.buckets == one.gradients and rank.gathered == 0
        assert rank.total == one.total + one.gradients
    assert ddp["lora"].buckets == 4 * LORA and ddp["full"].buckets == 2 * TOTAL


@pytest.mark.parametrize("world", [2, 8])
def test_fsdp_shards_weights_gradients_and_optimizer_and_gathers_one_layer(world):
    single, fsdp = tiny_estimate().breakdowns, tiny_estimate(world_size=world, strategy="fsdp").breakdowns
    for mode in ("full", "lora", "qlora"):
        one, rank = single[mode], fsdp[mode]
        assert rank.base == one.base / world  # the frozen base (the 4-bit storage for QLoRA) split N ways
        assert (rank.weights, rank.gradients, rank.optimizer) == (one.weights / world, one.gradients / world,
                                                                  one.optimizer / world)
        assert (rank.activations, rank.logits, rank.scratch) == (one.activations, one.logits, one.scratch)
        assert rank.buckets == 0
    # gathered whole: the root's parameters (and full FT's gradients of them) and the largest layer's, bf16
    assert fsdp["full"].gathered == 2 * ROOT + 2 * ROOT + 2 * LAYER + 2 * LAYER
    assert fsdp["lora"].gathered == 2 * ROOT + (2 * LAYER + 4 * LAYER_LORA) + 4 * LAYER_LORA
    assert fsdp["qlora"].gathered == 2 * ROOT + (LAYER_NF4 + 2 * (LAYER - 9216) + 4 * LAYER_LORA) + 4 * LAYER_LORA
    assert fsdp["qlora"].base == (2 * LAYER_NF4 + 2 * (TOTAL - QUANTIZED)) / world


def test_fsdp_per_rank_memory_falls_with_the_world_size_on_a_7b_model():
    config = preset_config("Llama-2-7B")
    totals = [memory.estimate(config, world_size=n, strategy="fsdp").breakdowns["lora"].total for n in (1, 2, 8)]
    assert totals[0] > totals[1] > totals[2]
    ddp = memory.estimate(config, world_size=8, strategy="ddp").breakdowns["lora"]
    assert ddp.total > totals[0]  # DDP adds buckets to a whole replica


def test_cli_world_size_and_strategy(capsys):
    assert main(["memory", "Llama-2-7B", "--world-size", "8", "--strategy", "fsdp", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["settings"]["world_size"], data["settings"]["strategy"]) == (8, "fsdp")
    assert data["estimates"]["lora"]["gathered"] > 0 and "Per rank of 8 (FSDP2)" in data["convention"]
    assert main(["memory", "Llama-2-7B", "--world-size", "2", "--strategy", "ddp"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 2 processes, ddp" in out and "DDP grad buckets" in out and "total per rank" in out
    assert "FSDP gathered" not in out
    assert main(["memory", "Llama-2-7B", "--world-size", "0"]) == 2
    assert "world_size must be >= 1" in capsys.readouterr().err
    assert main(["memory", "Llama-2-7B"]) == 0
    assert "per rank" not in capsys.readouterr().out  # one process: today's table


# --- the command -------------------------------------------------------------------------------------

def test_json_output(capsys):
    result = memory.memory("SmolLM2-135M", seq_len=512, as_json=True)
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(json.dumps(result))
    assert data["units"] == "bytes"
    assert data["params"]["total"] == 134_515_008
    assert data["settings"]["target_modules"] == ["q_proj", "v_proj"]
    assert "Pure bf16" in data["convention"]
    for mode in ("full", "lora", "qlora"):
        parts = data["estimates"][mode]
        assert set(parts) == {"weights", "gradients", "optimizer", "activations", "logits", "scratch", "base",
                              "buckets", "gathered", "total"}
        assert parts["buckets"] == parts["gathered"] == 0  # one process
        expected = parts["weights"] + parts["optimizer"] + max(
            parts["gradients"], parts["activations"] + max(parts["logits"], parts["scratch"]))
        assert abs(parts["total"] - expected) <= 2  # rounding of each part
    assert data["estimates"]["qlora"]["weights"] < data["estimates"]["lora"]["weights"]


def test_cli_table_and_flags(capsys):
    assert main(["memory", "Llama-2-7B", "--dtype", "fp32", "--optimizer", "adamw8bit", "--gradient-checkpointing",
                 "--target-modules", "all-linear", "--r", "16"]) == 0
    out = capsys.readouterr().out
    assert "fp32, adamw8bit" in out and "gradient checkpointing on" in out
    assert "LoRA r=16 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in out
    for row in ("weights", "gradients", "optimizer states", "activations", "logits", "backward scratch", "total",
                "Convention:"):
        assert row in out


def test_model_folder_and_config_file(tmp_path, capsys):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    by_folder = memory.memory(str(tmp_path), as_json=True)
    by_file = memory.memory(str(tmp_path / "config.json"), as_json=True)
    assert by_folder["params"]["total"] == by_file["params"]["total"] == TOTAL


@pytest.mark.parametrize("argument, message", [
    ("no-such-model", "neither a preset"),
    ("{tmp}", "neither a preset"),           # a folder without config.json
    ("{tmp}/bad.json", "not valid JSON"),
    ("{tmp}/typeless.json", "no 'model_type'"),
])
def test_bad_model_argument(tmp_path, argument, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "typeless.json").write_text('{"hidden_size": 8}')
    with pytest.raises(ValueError, match=message):
        memory.memory(argument.format(tmp=tmp_path))


def test_bad_arguments_on_the_command_line(capsys):
    assert main(["memory", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "lorakit memory: error" in err and "Llama-2-7B" in err
    assert main(["memory", "SmolLM2-135M", "--target-modules", "nothing_here"]) == 2
    assert "matched no module" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["memory", "SmolLM2-135M", "--dtype", "int3"])


@pytest.mark.parametrize("shape", [(64, 64), (576, 1536), (33, 7)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_equal_the_implementations(shape, double_quant):
    from lorakit.memory import nf4_bytes
    from lorakit.quant import quantize_nf4

    weight = torch.randn(*shape)
    assert nf4_bytes(weight.numel(), double_quant) == quantize_nf4(weight, double_quant=double_quant).nbytes
