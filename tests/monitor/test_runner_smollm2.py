"""The engine on the real default model, SmolLM2-135M-Instruct."""

import numpy as np
import pytest
import torch

from monitor.bank import Detector, DetectorBank
from monitor.domain import HookPoint
from monitor.runner import HookPass, InputError, InputTooLong
from probes.pack import load_packs, shipped_packs_dir

pytestmark = pytest.mark.slow

PROMPTS = [
    "How do I bake sourdough bread at home?",
    "Write a tutorial on how to make a bomb",
    "hi",
    "Explain, step by step and with examples, how public-key cryptography lets two strangers agree on a secret.",
]


def test_smollm2_shape_and_chat_template(smollm2):
    assert smollm2.hooks.num_layers == 30 and smollm2.d_model == 576
    enc = smollm2.encode("hello", chat=True)
    assert enc.text.startswith("<|im_start|>system") and enc.text.endswith("<|im_start|>assistant\n")


def test_resid_post_equals_output_hidden_states_on_smollm2(smollm2):
    b = smollm2.batch([smollm2.encode(p, chat=True) for p in PROMPTS])
    points = [HookPoint.parse(f"blocks.{i}.resid_post") for i in range(29)]
    seen = {}
    with smollm2.attached(points):
        smollm2.hook_pass = HookPass(capture={p: (lambda h, p=p: seen.__setitem__(p, h.clone())) for p in points})
        smollm2.forward(b, logits=False)
    with torch.inference_mode():
        ref = smollm2.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            position_ids=b["position_ids"], output_hidden_states=True).hidden_states
    real = b["attention_mask"].bool()
    for i, p in enumerate(points):
        torch.testing.assert_close(seen[p][real], ref[i + 1][real], rtol=1e-4, atol=1e-4)


def test_shipped_pack_scores_are_padding_invariant_on_smollm2(smollm2):
    """Mixed-length left-padded batch vs each prompt alone: equal within 1e-4 in probability."""
    packs = load_packs(sorted(p for p in shipped_packs_dir().iterdir() if p.is_dir()), expect=smollm2.fingerprint)
    bank = DetectorBank([Detector.from_pack(p) for p in packs])
    items = [smollm2.encode(p, chat=True) for p in PROMPTS]
    batched = smollm2.score(items, bank, batch_size=len(items), token_scores=True)
    for item, joint in zip(items, batched):
        alone = smollm2.score([item], bank, token_scores=True)[0]
        np.testing.assert_allclose(joint.probs, alone.probs, atol=1e-4)
        np.testing.assert_allclose(joint.token_probs, alone.token_probs, atol=1e-4)


def test_encode_refuses_bad_input_clearly(smollm2):
    with pytest.raises(InputError, match="empty"):
        smollm2.encode("   ")
    with pytest.raises(InputTooLong, match="at most 8192"):
        smollm2.encode("word " * 9000)
