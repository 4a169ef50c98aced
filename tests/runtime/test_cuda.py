"""The CUDA path of the torch backend: lossless against transformers generate on the same GPU."""

import pytest
import torch

from runtime import Generator
from tests.conftest import LOSSLESS_NEW_TOKENS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch)"),
]


@pytest.fixture(scope="module")
def cuda_reference(real_model_dir, lossless_prompts):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).to("cuda").eval()
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


@pytest.mark.parametrize("method", ["vanilla", "ngram", "ppd"])
def test_cuda_method_matches_transformers_generate(method, real_model_dir, lossless_prompts, cuda_reference, request):
    if method == "ppd":
        request.getfixturevalue("trained_ppd_checkpoint")
    gen = Generator.from_pretrained(real_model_dir, method=method, device="cuda")
    bad = [item.id for item in lossless_prompts
           if gen.generate(cuda_reference[item.id][0], max_new_tokens=LOSSLESS_NEW_TOKENS).token_ids
           != cuda_reference[item.id][1]]
    assert not bad, f"{method} on CUDA differs from transformers greedy on {bad}"
