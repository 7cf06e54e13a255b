"""The fused QLoRA path against peft: the same loss and the same gradient for every LoRA
parameter, on the tiny random Llama with a real bitsandbytes NF4 base (CPU, fp32: tight
tolerance; the ``gpu`` tier repeats it in fp16 and bf16 on CUDA)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qlora_ray import data  # noqa: E402
from qlora_ray.kernels import fuse  # noqa: E402
from qlora_ray.kernels.elementwise import dropout_mask  # noqa: E402
from qlora_ray.model import add_lora, load_base, set_gradient_checkpointing  # noqa: E402
from qlora_ray.spec import load_spec  # noqa: E402

from qlora_ray.loss import token_loss  # noqa: E402

from tests.conftest import write_tiny_spec  # noqa: E402


class _MaskDropout(torch.nn.Module):
    """peft's LoRA dropout drawing its mask as the fused path does, so both see the same masks."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * dropout_mask(x, self.p) if self.training else x


def _model(tmp_path, model_dir, data_dir, dropout=0.0, checkpointing=False, compute="fp32", device="cpu",
           kept=False):
    # kept: the CPU's NF4 base dequantized once (quantization.cpu_dequantize), plain weights.
    spec = load_spec(write_tiny_spec(
        tmp_path, model_dir, data_dir,
        quantization=f"{{mode: nf4, compute_dtype: {compute}, cpu_dequantize: {str(kept).lower()}}}",
        lora=f"{{r: 4, alpha: 8, dropout: {dropout}}}",
        train=f"{{max_steps: 2, batch_size: 4, gradient_checkpointing: {str(checkpointing).lower()}}}",
        resources=f"{{gpus_per_trial: {1 if device == 'cuda' else 0}}}"))
    torch.manual_seed(0)
    model, tokenizer, _, _ = load_base(spec, device=device)
    model = add_lora(model, spec)
    with torch.no_grad():  # B starts at zero: give it values so every A gradient is non-zero too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    for module in model.modules():
        if hasattr(module, "lora_dropout") and dropout > 0:
            module.lora_dropout["default"] = _MaskDropout(dropout)
    batch = data.train_batches(data.prepare(spec.data, tokenizer), spec.data, 4, 0, 0)[0]
    return model, batch


def _loss_and_grads(model, batch, seed=1, dtype=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, count = token_loss(model, batch, dtype)
    (loss / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _compare(ref, got, rtol):
    (loss_ref, grads_ref), (loss_got, grads_got) = ref, got
    assert loss_got == pytest.approx(loss_ref, rel=rtol)
    assert grads_got.keys() == grads_ref.keys() and len(grads_ref) > 0
    for name, g in grads_ref.items():
        assert g.abs().sum() > 0, name
        error = (grads_got[name].float() - g.float()).norm() / g.float().norm()
        assert error < rtol, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("dropout,checkpointing,kept", [(0.0, False, False), (0.0, True, False), (0.1, False, False),
                                                        (0.1, True, False), (0.0, False, True), (0.1, True, True)])
def test_fused_loss_and_lora_gradients_match_peft_on_cpu(tmp_path, tiny_model_dir, tiny_data_dir, dropout,
                                                         checkpointing, kept):
    model, batch = _model(tmp_path, tiny_model_dir, tiny_data_dir, dropout, checkpointing, kept=kept)
    reference = _loss_and_grads(model, batch)
    with fuse(model) as handle:
        assert (handle.attention, handle.mlp) == (2, 2)
        fused = _loss_and_grads(model, batch)
    _compare(reference, fused, rtol=1e-5)
    _compare(reference, _loss_and_grads(model, batch), rtol=1e-6)  # unfused again: peft's own path


def test_offloaded_checkpointing_matches(tmp_path, tiny_model_dir, tiny_data_dir):
    model, batch = _model(tmp_path, tiny_model_dir, tiny_data_dir, 0.1, checkpointing=True)
    reference = _loss_and_grads(model, batch)
    with fuse(model, offload=True) as handle:
        assert handle.offloaded == 2
        _compare(reference, _loss_and_grads(model, batch), rtol=1e-5)


def test_training_steps_match_peft_and_adapter_stays_standard(tmp_path, tiny_model_dir, tiny_data_dir):
    """Three optimizer steps each way: the LoRA casts follow the updated weights (no stale
    copies), and the fused model saves an adapter with peft's names that loads back."""
    from peft import PeftModel, get_peft_model_state_dict

    def train(fused: bool):
        model, batch = _model(tmp_path, tiny_model_dir, tiny_data_dir)
        handle = fuse(model) if fused else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(3):
            loss, _ = _loss_and_grads(model, batch)
            optimizer.step()
            losses.append(loss)
        return model, handle, losses, batch

    reference, _, ref_losses, batch = train(False)
    model, handle, losses, _ = train(True)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0]
    names = set(get_peft_model_state_dict(model))
    assert names == set(get_peft_model_state_dict(reference))
    model.save_pretrained(tmp_path / "adapter")
    handle.unfuse()
    assert not any("forward" in m.__dict__ for m in model.modules())
    (tmp_path / "b").mkdir()
    base, _ = _model(tmp_path / "b", tiny_model_dir, tiny_data_dir)
    loaded = PeftModel.from_pretrained(base.get_base_model(), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert float(token_loss(loaded, batch)[0]) == pytest.approx(float(token_loss(model, batch)[0]), rel=1e-5)


def test_adapters_off_and_generation_fall_back_to_peft(tmp_path, tiny_model_dir, tiny_data_dir):
    model, batch = _model(tmp_path, tiny_model_dir, tiny_data_dir)
    prompt = batch["input_ids"][:1, :8]
    with torch.no_grad():
        with model.disable_adapter():
            base_loss = float(token_loss(model, batch)[0])
        tuned_loss = float(token_loss(model, batch)[0])
        model.eval()
        reply = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
        with fuse(model):
            with model.disable_adapter():
                assert float(token_loss(model, batch)[0]) == pytest.approx(base_loss, rel=1e-6)
            assert float(token_loss(model, batch)[0]) == pytest.approx(tuned_loss, rel=1e-5)
            assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False), reply)
    assert base_loss != pytest.approx(tuned_loss)


def test_fuse_refuses_a_model_without_lora(tmp_path, tiny_model_dir, tiny_data_dir):
    model, _ = _model(tmp_path, tiny_model_dir, tiny_data_dir)
    with pytest.raises(ValueError, match="no peft LoRA"):
        fuse(model.get_base_model().model.embed_tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("compute", ["fp16", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_matches_peft_on_cuda(tmp_path, tiny_model_dir, tiny_data_dir, compute, checkpointing):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, batch = _model(tmp_path, tiny_model_dir, tiny_data_dir, 0.0, checkpointing, compute, "cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[compute]
    reference = _loss_and_grads(model, batch, dtype=dtype)
    with fuse(model):
        fused = _loss_and_grads(model, batch, dtype=dtype)
    # Half precision: the fused path rounds in other places (it keeps activations in the
    # compute dtype where peft goes through fp32), so a few parts in a thousand.
    _compare(reference, fused, rtol=2e-2 if compute == "bf16" else 5e-3)
