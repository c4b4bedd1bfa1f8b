"""Per-sequence attention on padding-free rows computes what attending to each sequence alone computes."""

from __future__ import annotations

import torch
from tiny_archs import FAMILIES, build_tiny

from skytune.core.models import attention


def test_varlen_sdpa_matches_each_sequence_alone(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    for family in FAMILIES:
        path = build_tiny(family, tmp_path / family)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        sequences = [torch.randint(5, 300, (n,)) for n in (7, 19, 3)]
        with torch.no_grad():
            alone = [model(input_ids=s[None]).logits[0] for s in sequences]
            assert attention.use_varlen_sdpa(model)
            assert model.config._attn_implementation == attention.NAME
            lengths = torch.tensor([len(s) for s in sequences])
            row = torch.cat(sequences)[None]
            positions = torch.cat([torch.arange(n) for n in lengths])[None]
            bounds = torch.cat([torch.zeros(1), lengths.cumsum(0)]).to(torch.int32)
            packed = model(input_ids=row, position_ids=positions, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                           max_length_q=int(lengths.max()), max_length_k=int(lengths.max())).logits[0]
            padded = model(input_ids=torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True),
                           attention_mask=torch.nn.utils.rnn.pad_sequence(
                               [torch.ones_like(s) for s in sequences], batch_first=True)).logits
        assert torch.allclose(packed, torch.cat(alone), atol=1e-5), family
        for i, s in enumerate(sequences):  # padded batches still take transformers' own SDPA path
            assert torch.allclose(padded[i, : len(s)], alone[i], atol=1e-5), family
