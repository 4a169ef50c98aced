"""The CUDA paths (gpu marker; `make gpu-check` runs them on a lent GPU): the torch backend's static steps
replayed as CUDA graphs give the eager static step's bits; every method on them is token-identical to
vanilla on the same backend and dtype (fp32 and bf16); vanilla fp32 matches transformers' generate; the
onnxruntime CUDA EP (when onnxruntime-gpu is installed) runs static steps with its CUDA graphs."""

import pytest
import torch

from runtime import Generator
from runtime.backends.torch_backend import TorchBackend
from runtime.draft import Draft, Layout
from tests.conftest import LOSSLESS_NEW_TOKENS, TRAINED_FIXTURES, first_difference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)"),
]
METHODS = ["ngram", "ppd", "hybrid", "ht"]


@pytest.fixture(scope="module")
def cuda_reference(real_model_dir, lossless_prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).to("cuda").eval()
    gen = Generator.from_pretrained(real_model_dir, device="cuda")
    reference = {}
    with torch.inference_mode():
        for item in lossless_prompts:
            ids = gen.encode(item.prompt)
            x = torch.tensor([ids], device="cuda")
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=LOSSLESS_NEW_TOKENS,
                                 do_sample=False, pad_token_id=gen.tokenizer.eos_token_id)
            reference[item.id] = (ids, out[0, len(ids):].tolist())
    return reference


def test_cuda_vanilla_matches_transformers_generate(real_model_dir, lossless_prompts, cuda_reference):
    gen = Generator.from_pretrained(real_model_dir, device="cuda")
    assert gen.backend.info.step_sizes is not None   # static steps, CUDA graphs: the CUDA default
    bad = [item.id for item in lossless_prompts
           if gen.generate(cuda_reference[item.id][0], max_new_tokens=LOSSLESS_NEW_TOKENS).token_ids
           != cuda_reference[item.id][1]]
    assert not bad, f"vanilla on CUDA differs from transformers greedy on {bad}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_every_method_on_cuda_graphs_equals_vanilla_on_them(dtype, real_model_dir, lossless_prompts, request):
    for fixture in {TRAINED_FIXTURES[m] for m in METHODS if m in TRAINED_FIXTURES}:
        request.getfixturevalue(fixture)
    vanilla = Generator.from_pretrained(real_model_dir, device="cuda", dtype=dtype)
    want = {item.id: vanilla.generate(item.prompt, max_new_tokens=LOSSLESS_NEW_TOKENS).token_ids
            for item in lossless_prompts}
    bad = []
    for method in METHODS:
        gen = Generator.from_pretrained(real_model_dir, method=method, device="cuda", dtype=dtype)
        for item in lossless_prompts:
            first = first_difference(gen.generate(item.prompt, max_new_tokens=LOSSLESS_NEW_TOKENS).token_ids,
                                     want[item.id])
            if first is not None:
                bad.append(f"{method} {item.id}: first difference at new token {first}")
    assert not bad, f"methods on CUDA graphs ({dtype}) that differ from vanilla: {bad}"


def test_a_replayed_cuda_graph_gives_the_eager_static_steps_bits(real_model_dir):
    from export.checkpoint import load_checkpoint
    from export.step_model import StepModel

    hf, _ = load_checkpoint(real_model_dir)
    sizes = (8, 64)
    backends = [TorchBackend(StepModel(hf), 512, device="cuda", step_sizes=sizes, cuda_graphs=graphs)
                for graphs in (False, True)]
    parents = [-1, 0, 0, 1, 1, 2, 2, 3]
    steps = [Draft.chain(list(range(100, 140))), Draft(list(range(8)), Layout.from_parents(parents)),
             Draft(list(range(9, 14)), Layout.from_parents(parents[:5]))]
    for draft in steps:
        outputs = [b.step(draft).logits.clone() for b in backends]
        assert torch.equal(outputs[0], outputs[1]), f"T={draft.size}"
        for b in backends:
            b.commit([0, 1])


def test_onnxruntime_cuda_graphs_equal_vanilla(real_model_dir, lossless_prompts, request):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (pip install -e '.[gpu]'); this onnxruntime has no CUDA EP")
    request.getfixturevalue("trained_ppd_checkpoint")
    vanilla = Generator.from_pretrained(real_model_dir, backend="onnxruntime", device="cuda")
    hybrid = Generator.from_pretrained(real_model_dir, method="hybrid", backend="onnxruntime", device="cuda")
    bad = [item.id for item in lossless_prompts
           if hybrid.generate(item.prompt, max_new_tokens=LOSSLESS_NEW_TOKENS).token_ids
           != vanilla.generate(item.prompt, max_new_tokens=LOSSLESS_NEW_TOKENS).token_ids]
    assert not bad, f"hybrid on onnxruntime's CUDA graphs differs from vanilla on {bad}"
