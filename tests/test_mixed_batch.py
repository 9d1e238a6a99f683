"""Mixed-adapter batches: every row equals what it gets alone with its adapter."""

import pytest
import torch

from lorakit import BASE_ADAPTER, LoraConfig, get_peft_model
from lorakit.layers import AdapterRouting, autograd, stacked
from lorakit.layers.linear import Linear

from conftest import tiny_bert_classifier, tiny_llama


def three_adapters():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
                           adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules="all-linear"))
    model.add_adapter("c", LoraConfig(r=8, init_lora_weights=False, target_modules=["embed_tokens", "o_proj"]))
    return model.eval()


def alone(model, name, ids):
    with torch.no_grad():
        if name == BASE_ADAPTER:
            with model.disable_adapter():
                return model(ids).logits
        model.set_adapter(name)
        return model(ids).logits


def generate_alone(model, name, ids, **kw):
    """`generate` on `ids` with adapter `name` alone (BASE_ADAPTER: adapters disabled)."""
    if name == BASE_ADAPTER:
        with model.disable_adapter():
            return model.generate(input_ids=ids, **kw)
    model.set_adapter(name)
    return model.generate(input_ids=ids, **kw)


def test_each_row_matches_its_adapter_alone():
    model = three_adapters()
    ids = torch.randint(0, 100, (6, 7), generator=torch.Generator().manual_seed(0))
    names = ["b", "a", BASE_ADAPTER, "c", "a", "b"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone(model, name, ids[row:row + 1])[0], rtol=1e-5, atol=1e-5)


def test_generate_with_mixed_adapters_matches_single_runs():
    model = three_adapters()
    ids = torch.randint(1, 100, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["c", BASE_ADAPTER, "a"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **kw)
        for row, name in enumerate(names):
            assert torch.equal(mixed[row], generate_alone(model, name, ids[row:row + 1], **kw)[0])


def test_modules_to_save_route_per_row():
    model = get_peft_model(tiny_bert_classifier(), LoraConfig(target_modules=["query"], modules_to_save=["classifier"],
                                                              init_lora_weights=False), adapter_name="x")
    model.add_adapter("y", LoraConfig(target_modules=["value"], modules_to_save=["classifier"], init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["y"].weight.add_(1.0)
    model.eval()
    ids = torch.randint(0, 100, (3, 6))
    names = ["y", "x", BASE_ADAPTER]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone(model, name, ids[row:row + 1])[0], rtol=1e-5, atol=1e-5)


def test_errors():
    model = three_adapters()
    ids = torch.randint(0, 100, (2, 4))
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        model(ids, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="2 rows"):
        model(ids, adapter_names=["a", "b", "c"])
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="merged"):
        model(ids, adapter_names=["a", "b"])


def test_routing_groups_rows_once_and_repeats_for_beams():
    routing = AdapterRouting(["a", BASE_ADAPTER, "a", "b"])
    groups = routing.groups(4, torch.device("cpu"))
    assert [(n, r.tolist()) for n, r in groups] == [("a", [0, 2]), ("b", [3])]
    assert routing.groups(4, torch.device("cpu")) is groups  # built once per batch shape
    assert [(n, r.tolist()) for n, r in routing.groups(8, torch.device("cpu"))] == [("a", [0, 1, 4, 5]), ("b", [6, 7])]


# --- the stacked path (layers.stacked): one gathered product per factor for the whole batch ---------------

@pytest.fixture
def stack_calls(monkeypatch):
    """Counts of stacked products and stack builds, per layer type: {"apply": {type: n}, "build": {type: n}}."""
    calls = {"apply": {}, "build": {}}
    apply, build = stacked.LoraStack.apply, stacked.LoraStack.__init__

    def counted_apply(self, x, idx, shared=None, **kwargs):
        key = "Embedding" if self.embedding else "Linear"
        calls["apply"][key] = calls["apply"].get(key, 0) + 1
        if kwargs.get("base") is not None:
            calls["fused"] = calls.get("fused", 0) + 1
        return apply(self, x, idx, shared, **kwargs)

    def counted_build(self, layer):
        calls["build"][type(layer).__name__] = calls["build"].get(type(layer).__name__, 0) + 1
        build(self, layer)

    monkeypatch.setattr(stacked.LoraStack, "apply", counted_apply)
    monkeypatch.setattr(stacked.LoraStack, "__init__", counted_build)
    return calls


def five_adapters():
    """Ranks 4, 2, 8, 6, 3; alphas; rsLoRA; lora_bias; adapters on some layers only; one on the embedding."""
    model = three_adapters()
    model.add_adapter("rs", LoraConfig(r=6, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                                       target_modules=["k_proj", "down_proj"]))
    model.add_adapter("bias", LoraConfig(r=3, lora_alpha=5, lora_bias=True, init_lora_weights=False,
                                         target_modules=["q_proj", "gate_proj"]))
    return model.eval()


def mixed(model, ids, names, plain=False):
    with torch.no_grad(), autograd.lora_path("plain" if plain else "function"):
        return model(ids, adapter_names=names).logits


def assert_rows_alone(model, ids, names, out, tol=1e-5):
    for row, name in enumerate(names):
        torch.testing.assert_close(out[row], alone(model, name, ids[row:row + 1])[0], rtol=tol, atol=tol)


def test_stacked_rows_match_alone_and_the_grouped_path(stack_calls):
    model = five_adapters()
    ids = torch.randint(0, 100, (7, 6), generator=torch.Generator().manual_seed(3))
    names = ["rs", "b", BASE_ADAPTER, "bias", "c", "a", "rs"]
    out = mixed(model, ids, names)
    assert stack_calls["apply"]["Linear"] == 2 * 7  # every decoder linear ("b" is all-linear), one product each
    assert stack_calls["fused"] == 2 * 7  # float32 nn.Linear bases: their product too
    assert stack_calls["apply"]["Embedding"] == 1
    torch.testing.assert_close(out, mixed(model, ids, names, plain=True), rtol=1e-5, atol=1e-5)
    assert_rows_alone(model, ids, names, out)


@pytest.mark.parametrize("names", [["bias", "a", BASE_ADAPTER, "b"], ["bias"] * 3])  # gathered; one shared slot
def test_plain_linear_bases_run_their_product_inside_the_stack(names, stack_calls):
    """A float nn.Linear base's product is added into the LoRA output (`base=`), its bias and
    lora_bias included; a base with a forward hook is called as itself. Both equal the grouped path."""
    model = five_adapters()
    for layer in model.modules():  # give every base linear a bias
        if isinstance(layer, Linear) and layer.base_layer.bias is None:
            base = layer.base_layer
            base.bias = torch.nn.Parameter(torch.randn(base.out_features) / 10, requires_grad=False)
    ids = torch.randint(0, 100, (len(names), 6), generator=torch.Generator().manual_seed(12))
    out = mixed(model, ids, names)
    holding = {n for n in names if n != BASE_ADAPTER}
    on_linears = [m for m in model.modules() if isinstance(m, Linear) and holding & set(m.adapters)]
    assert stack_calls["fused"] == stack_calls["apply"]["Linear"] == len(on_linears)
    torch.testing.assert_close(out, mixed(model, ids, names, plain=True), rtol=1e-5, atol=1e-5)
    assert_rows_alone(model, ids, names, out)
    seen = []
    hooked = model.base_model.model.model.layers[0].self_attn.q_proj
    handle = hooked.base_layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    stack_calls["fused"] = 0
    torch.testing.assert_close(mixed(model, ids, names), out, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert seen == [(len(names), 6, hooked.out_features)] and stack_calls["fused"] == len(on_linears) - 1


def test_a_hook_added_between_two_forwards_of_one_routing_runs(stack_calls):
    """Inside one `mixed_batch` block (as in `generate`), a hook registered on a base layer after
    the first forward runs from the next one on: the base layer is called again, not fused past."""
    model = five_adapters()
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(13))
    names = ["b", "a", BASE_ADAPTER]
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj  # holds a and b
    with torch.no_grad(), model.base_model.mixed_batch(names):
        first = model(ids).logits
        handle = q_proj.base_layer.register_forward_hook(lambda module, args, output: output * 0)
        stack_calls["fused"] = 0
        hooked = model(ids).logits
    assert stack_calls["fused"] == 2 * 7 - 1 and not torch.allclose(hooked, first)
    torch.testing.assert_close(hooked, mixed(model, ids, names, plain=True), rtol=1e-5, atol=1e-5)
    handle.remove()


def test_input_gradients_through_the_fused_product_equal_the_grouped_path(stack_calls):
    """Grad on, adapters and base frozen, an input that needs its gradient: the fused product runs
    and its input gradients (base bias included) equal the grouped path's."""
    model = five_adapters()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    layer.base_layer.bias = torch.nn.Parameter(torch.randn(layer.out_features) / 10, requires_grad=False)
    for p in model.parameters():
        p.requires_grad_(False)
    embeds = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(14))
    names = ["bias", "b", BASE_ADAPTER, "rs"]
    grads = []
    for path in ("function", "plain"):
        x = embeds.clone().requires_grad_()
        with autograd.lora_path(path):
            model(inputs_embeds=x, adapter_names=names).logits.square().sum().backward()
        grads.append(x.grad)
    assert stack_calls["fused"] == 2 * 7
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


class _DoubledWeight(torch.Tensor):
    """A weight subclass whose F.linear uses 2 · W (as a quantized tensor runs its own product)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            x, weight, *rest = args
            return torch.nn.functional.linear(x, weight.as_subclass(torch.Tensor) * 2, *rest)
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("names", [["b", "a", BASE_ADAPTER], ["b"] * 3])
def test_a_tensor_subclass_weight_runs_its_own_product(names, stack_calls):
    model = five_adapters()
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    base.weight = torch.nn.Parameter(base.weight.detach().as_subclass(_DoubledWeight), requires_grad=False)
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(15))
    out = mixed(model, ids, names)
    assert stack_calls["fused"] == stack_calls["apply"]["Linear"] - 1
    torch.testing.assert_close(out, mixed(model, ids, names, plain=True), rtol=1e-5, atol=1e-5)


def test_stack_apply_takes_the_base_output_or_the_base_factors():
    model = five_adapters()
    stack = stacked.stack_for(model.base_model.model.model.layers[0].self_attn.q_proj)
    x, idx = torch.randn(2, 3, 32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="result=.*base=.*one of them"):
        stack.apply(x, idx)
    embedding = stacked.stack_for(model.base_model.model.model.embed_tokens)  # "c" targets it
    with pytest.raises(ValueError, match="base= is for a Linear"):
        embedding.apply(torch.tensor([[1, 2]]), torch.tensor([1]), base=(torch.zeros(3, 3), None))


def test_generate_with_repeated_rows_matches_single_runs(stack_calls):
    model = five_adapters()
    ids = torch.randint(1, 100, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["bias", BASE_ADAPTER, "rs"]
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=ids, adapter_names=names, **kw)  # (6, T): each row twice
        assert stack_calls["apply"]
        for row, name in enumerate(names):
            assert torch.equal(out[2 * row:2 * row + 2], generate_alone(model, name, ids[row:row + 1], **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base(dtype, stack_calls):
    model = get_peft_model(tiny_llama().to(dtype), LoraConfig(r=4, init_lora_weights=False,
                                                              target_modules="all-linear"), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["v_proj"]))
    model.eval()
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(5))
    names = ["b", "a", BASE_ADAPTER, "a"]
    out = mixed(model, ids, names)
    assert out.dtype == dtype and stack_calls["apply"]["Linear"]
    # The same additions in the same dtype as the grouped path; a row alone differs by rounding only.
    torch.testing.assert_close(out, mixed(model, ids, names, plain=True), rtol=1e-2, atol=1e-2)
    assert_rows_alone(model, ids, names, out, tol=5e-2)


def test_4bit_base_uses_the_stack(stack_calls):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "up_proj"]),
                           adapter_name="a", quantize="nf4")
    model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, target_modules=["up_proj"]))
    model.eval()
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(6))
    names = ["a", "b", BASE_ADAPTER]
    out = mixed(model, ids, names)
    assert stack_calls["apply"]["Linear"] == 4
    assert_rows_alone(model, ids, names, out)


def test_dora_layers_take_the_grouped_path(stack_calls):
    model = three_adapters()
    model.add_adapter("d", LoraConfig(r=4, use_dora=True, init_lora_weights=False, target_modules=["q_proj"]))
    model.eval()
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(7))
    names = ["d", "a", "b", BASE_ADAPTER]
    out = mixed(model, ids, names)
    assert stack_calls["apply"]["Linear"] == 2 * 7 - 2  # both q_proj layers hold "d": grouped
    assert_rows_alone(model, ids, names, out)


def test_dropout_in_train_mode_and_gradients_take_the_grouped_path(stack_calls):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False,
                                                    target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"]))
    ids = torch.randint(0, 100, (2, 6))
    model.train()
    with torch.no_grad():
        model(ids, adapter_names=["a", "b"])
    assert not stack_calls["apply"]  # "a" drops out in train mode
    model.eval()
    loss = model(ids, adapter_names=["a", "b"]).logits.square().mean()  # grad mode: the factors need gradients
    assert not stack_calls["apply"]
    loss.backward()
    for layer in model.base_model.model.model.layers:  # "a" is the trainable adapter
        assert layer.self_attn.q_proj.lora_B["a"].weight.grad.abs().sum() > 0
    with torch.no_grad():
        model(ids, adapter_names=["a", "b"])
    assert stack_calls["apply"]["Linear"] == 2  # eval, no gradients: stacked


def test_stack_is_built_once_and_rebuilt_on_every_change(stack_calls, tmp_path):
    model = three_adapters()
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(8))
    names = ["a", "b", "c"]
    n_layers = 2 * 7 + 1  # "b" on every linear, "c" on the embedding
    with torch.inference_mode():  # a stack built here still serves forwards outside inference mode
        mixed(model, ids, names)
    mixed(model, ids, names)
    assert sum(stack_calls["build"].values()) == n_layers  # two forwards, one build per layer
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj

    def rebuilt_and_right() -> bool:
        before = sum(stack_calls["build"].values())
        out = mixed(model, ids, names)
        assert_rows_alone(model, ids, names, out)
        return sum(stack_calls["build"].values()) > before

    with torch.no_grad():  # trained in place (a training step writes .add_ into the parameter)
        q_proj.lora_B["a"].weight.add_(0.5)
    assert rebuilt_and_right()
    with torch.no_grad():  # the storage swapped (what a load into an existing adapter does)
        q_proj.lora_A["b"].weight.data = torch.randn_like(q_proj.lora_A["b"].weight)
    assert rebuilt_and_right()
    q_proj.lora_B["a"].weight = torch.nn.Parameter(torch.randn_like(q_proj.lora_B["a"].weight))  # a new tensor
    assert rebuilt_and_right()
    embedding_b = model.base_model.model.model.embed_tokens.lora_embedding_B["c"]
    with torch.no_grad():
        embedding_b.mul_(2)
    assert rebuilt_and_right()
    assert not rebuilt_and_right()  # nothing changed since
    embedding_b.data.mul_(2)  # through .data: no version bump, as autograd does not see it either ...
    stacked.clear()  # ... so the stacks are dropped by hand
    assert rebuilt_and_right()
    model.add_adapter("e", LoraConfig(r=16, init_lora_weights=False, target_modules=["q_proj"]))
    names = ["e", "b", "a"]
    assert rebuilt_and_right()
    model.base_model.delete_adapter("e")
    names = ["a", "b", "c"]
    assert rebuilt_and_right()
    model.save_pretrained(tmp_path / "saved", selected_adapters=["a"])
    model.base_model.delete_adapter("a")
    model.load_adapter(tmp_path / "saved" / "a", adapter_name="a")  # (a non-default name: its subfolder)
    model.eval()
    assert rebuilt_and_right()
    model.merge_adapter(["a"])
    model.unmerge_adapter()
    assert not rebuilt_and_right()  # merging changes the base weight, which the stack does not hold


def test_stack_layout_and_bytes():
    model = five_adapters()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj  # a (r=4), b (r=2), bias (r=3)
    stack = stacked.stack_for(q_proj)
    assert stack.slots == {"a": 1, "b": 2, "bias": 3}
    assert tuple(stack.a.shape) == (4, 4, 32) and tuple(stack.b.shape) == (4, 4, 32)
    assert stack.nbytes == 4 * (4 * 4 * 32 * 2 + 4 * 32)
    assert stack.a[0].abs().sum() == 0 and stack.b[0].abs().sum() == 0 and stack.bias[0].abs().sum() == 0
    spec = q_proj.adapters["b"]
    torch.testing.assert_close(stack.a[2, :2], q_proj.lora_A["b"].weight.detach())
    assert stack.a[2, 2:].abs().sum() == 0 and stack.b[2, 2:].abs().sum() == 0  # rank padding: zeros
    torch.testing.assert_close(stack.b[2, :2], q_proj.lora_B["b"].weight.detach().T * spec.scaling)
    assert stacked.stack_for(q_proj) is stack


def test_autocast_takes_the_grouped_path(stack_calls):
    model = three_adapters()
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(9))
    names = ["a", "b", "c"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, adapter_names=names).logits
    assert "Linear" not in stack_calls["apply"]
    assert_rows_alone(model, ids, names, out.float(), tol=5e-2)


def test_adapters_made_under_inference_mode_take_the_grouped_path(stack_calls):
    """Inference tensors have no version counter, so a stack could not see them change: such
    factors run the grouped path (before, building the stack raised)."""
    with torch.inference_mode():
        model = three_adapters()
        ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(11))
        names = ["a", "b", BASE_ADAPTER]
        out = model(ids, adapter_names=names).logits
    assert "Linear" not in stack_calls["apply"]
    with torch.inference_mode():
        assert_rows_alone(model, ids, names, out)


@pytest.mark.parametrize("name", ["bias", "b", "rs"])
def test_rows_sharing_one_adapter_take_the_ungathered_product(name, monkeypatch):
    """All rows on one adapter (rank below r_max; lora_bias; on some layers only): the shared-slot
    product in every linear layer that holds it, equal to the adapter alone and to the gathered product."""
    model = five_adapters()
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(10))
    names = [name] * 4
    shared = []
    apply = stacked.LoraStack._apply_shared

    def recorded(self, x, slot, *args):
        shared.append(slot)
        return apply(self, x, slot, *args)

    monkeypatch.setattr(stacked.LoraStack, "_apply_shared", recorded)
    out = mixed(model, ids, names)
    holding = [m for m in model.modules() if isinstance(m, Linear) and name in m.adapters]
    assert len(shared) == len(holding) > 0 and stacked.ZERO_SLOT not in shared
    assert_rows_alone(model, ids, names, out)
    row_slots = stacked.LoraStack.row_slots
    monkeypatch.setattr(stacked.LoraStack, "row_slots", lambda self, *args: (row_slots(self, *args)[0], None))
    shared.clear()
    torch.testing.assert_close(mixed(model, ids, names), out, rtol=1e-5, atol=1e-5)  # gathered: the same
    assert not shared


@pytest.mark.parametrize("name", ["bias", "b", "rs"])
@pytest.mark.parametrize("base", ["plain", "biased", "hooked"])  # fused; fused with a base bias; result=
def test_long_one_adapter_batches_take_chunked_products(name, base, monkeypatch):
    """All rows on one adapter, at least SHARED_CHUNKED_FROM positions in whole chunks: batched
    products over chunks, with the slot's factors broadcast; equal to the plain shared products
    and to the adapter alone. Positions not in whole chunks take the plain products."""
    model = five_adapters()
    for layer in model.modules():
        if isinstance(layer, Linear) and base == "biased" and layer.base_layer.bias is None:
            layer.base_layer.bias = torch.nn.Parameter(torch.randn(layer.base_layer.out_features) / 10,
                                                       requires_grad=False)
        if isinstance(layer, Linear) and base == "hooked":
            layer.base_layer.register_forward_hook(lambda module, args, output: None)
    monkeypatch.setattr(stacked, "SHARED_CHUNKED_FROM", 16)
    monkeypatch.setattr(stacked, "SHARED_CHUNK", 4)
    chunks = []
    chunk = stacked.shared_chunk
    monkeypatch.setattr(stacked, "shared_chunk", lambda x: chunks.append(chunk(x)) or chunks[-1])
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(14))  # 24 positions: 6 chunks across rows
    names = [name] * 4
    out = mixed(model, ids, names)
    holding = [m for m in model.modules() if isinstance(m, Linear) and name in m.adapters]
    assert chunks == [4] * len(holding)
    assert_rows_alone(model, ids, names, out)
    chunks.clear()
    monkeypatch.setattr(stacked, "SHARED_CHUNK", 5)  # 24 positions: not whole chunks of 5
    torch.testing.assert_close(mixed(model, ids, names), out, rtol=1e-5, atol=1e-5)
    assert chunks == [None] * len(holding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the base output in the stack's dtype, or cast
def test_chunked_products_add_into_the_base_output_in_place(dtype, monkeypatch):
    """`apply(result=, in_place=True)` on the chunked one-slot path writes into `result` itself,
    the same sum as a fresh output, and equal to the plain one-slot products."""
    monkeypatch.setattr(stacked, "SHARED_CHUNKED_FROM", 16)
    monkeypatch.setattr(stacked, "SHARED_CHUNK", 4)
    layer = five_adapters().base_model.model.model.layers[0].self_attn.q_proj  # a, b, bias (lora_bias)
    stack = stacked.stack_for(layer)
    x = torch.randn(4, 6, layer.in_features, generator=torch.Generator().manual_seed(16))
    assert stacked.shared_chunk(x) == 4  # 24 positions in whole chunks: the chunked products
    for name in ("b", "bias"):
        idx, slot = stack.row_slots((name,) * 4, 1, x.device)
        result = layer.base_layer(x).to(dtype)  # (4, 6, out)
        fresh = stack.apply(x, idx, slot, result=result)
        kept = result.clone()
        out = stack.apply(x, idx, slot, result=result, in_place=True)
        assert out.data_ptr() == result.data_ptr() and not torch.equal(result, kept)
        torch.testing.assert_close(out, fresh, rtol=0, atol=0)
        monkeypatch.setattr(stacked, "SHARED_CHUNK", 5)  # 24 positions, not whole chunks: the plain products
        torch.testing.assert_close(out, stack.apply(x, idx, slot, result=kept), rtol=1e-3, atol=1e-3)
        monkeypatch.setattr(stacked, "SHARED_CHUNK", 4)


def test_shared_chunk_from_1024_positions_on_cpu():
    x = torch.zeros(2, 512, 8)
    assert stacked.shared_chunk(x) == stacked.SHARED_CHUNK == 64
    assert stacked.shared_chunk(x[:, :511]) is None  # not whole chunks
    assert stacked.shared_chunk(x[:1]) is None  # 512 positions
    assert stacked.shared_chunk(torch.zeros(1024, 8, device="meta")) is None  # CPU only


def test_row_slots_are_built_once_per_batch_composition():
    model = five_adapters()
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj  # a (slot 1), b (2), bias (3)
    stack = stacked.stack_for(q_proj)
    cpu = torch.device("cpu")
    idx, shared = stack.row_slots(("b", BASE_ADAPTER, "c", "bias"), 2, cpu)  # "c" is not on q_proj
    assert idx.tolist() == [2, 2, 0, 0, 0, 0, 3, 3] and shared is None
    assert stack.row_slots(("b", BASE_ADAPTER, "c", "bias"), 2, cpu)[0] is idx  # kept: a decode loop reuses it
    assert stack.row_slots(("a", "a"), 1, cpu)[1] == 1
    assert stack.row_slots((BASE_ADAPTER, "c"), 1, cpu)[1] == stacked.ZERO_SLOT
    for i in range(stacked.ROW_SLOTS_KEPT):  # bounded: the oldest composition goes first
        stack.row_slots(("a",) * (i + 1), 3, cpu)
    assert stack.row_slots(("b", BASE_ADAPTER, "c", "bias"), 2, cpu)[0] is not idx
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(11))
    out = mixed(model, ids, ["bias", "a"])  # a forward builds its routing afresh, the stack's index is reused
    assert ((("bias", "a"), 1, cpu)) in stack._row_slots
    assert_rows_alone(model, ids, ["bias", "a"], out)
