"""`lorakit generate` and `lorakit demo` take --device/--dtype: a device the machine lacks is one message, exit 2."""

import pytest
import torch

from lorakit import cli
from lorakit.generate import generate

from conftest import make_tiny_model_dir

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("generate") / "model")


@no_cuda
@pytest.mark.parametrize("command", [["generate", "hello"], ["demo"]])
def test_a_missing_device_is_one_message_before_any_work(command, tmp_path, capsys):
    out = tmp_path / "out"
    extra = ["--out", str(out)] if command == ["demo"] else []
    code = cli.main([*command, "--model", str(tmp_path / "no-such-model"), "--device", "cuda", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "no CUDA device" in err and "--device auto or cpu" in err
    assert "no-such-model" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # the demo wrote no task files


@pytest.mark.parametrize("command", [["generate", "hello"], ["demo"]])
def test_an_unknown_device_or_dtype_is_refused_by_the_cli(command, capsys):
    for flag, value in (("--device", "tpu"), ("--dtype", "int3")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, flag, value])
        assert exit_info.value.code == 2 and value in capsys.readouterr().err


@no_cuda  # auto must mean the CPU in fp32 for the first assertion
def test_generate_on_cpu_with_an_adapter(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    from conftest import perturb_trainables

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_trainables(peft_model, scale=1.0)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    auto = generate("copy : a b", model=str(model_dir), adapter=str(tmp_path / "adapter"), max_new_tokens=6)
    cpu = generate("copy : a b", model=str(model_dir), adapter=str(tmp_path / "adapter"), max_new_tokens=6,
                   device="cpu", dtype="fp32")
    plain = generate("copy : a b", model=str(model_dir), max_new_tokens=6, device="cpu")
    assert auto == cpu  # auto is the CPU in fp32 here
    assert cpu != plain  # the adapter took part
    assert cpu in capsys.readouterr().out  # streamed as it came
