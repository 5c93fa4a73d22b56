"""The labelled pair's tensors: collate against tensors built by hand."""
import torch

from pairs import Pair, collate, responses

def pair(prompt_ids, chosen_ids, rejected_ids):
    return Pair(round=0, step=0, prompt="p", chosen="c", rejected="r", chosen_src="pi", rejected_src="pi",
                chosen_score=1.0, rejected_score=0.0, prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids)

def test_collate_pads_prompts_left_responses_right_chosen_first():
    """dpo.pair_logps reads (prompt, chosen, rejected), each (ids, mask): prompts left-padded so that every
    prompt ends where its response begins, responses right-padded, the mask 1 exactly on real tokens."""
    P = 1    # the pad id
    got = collate([pair([5, 6, 7], [8, 0], [9, 10, 11, 0]), pair([4], [3, 3, 3, 0], [2, 0])], pad_id=P, device="cpu")
    want = [torch.tensor([[5, 6, 7], [P, P, 4]]), torch.tensor([[1, 1, 1], [0, 0, 1]]),            # prompts
            torch.tensor([[8, 0, P, P], [3, 3, 3, 0]]), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),  # chosen
            torch.tensor([[9, 10, 11, 0], [2, 0, P, P]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])]  # rejected
    assert len(got) == 6 and all(torch.equal(g, w) for g, w in zip(got, want)), got

class Words:
    """A tokenizer stand-in: id i decodes to the word w<i>."""
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids.tolist())

def test_responses_keep_each_sides_source_ids_and_log_prob():
    """A sampler's (a, b) rows become Response records: a's source is src[0], b's src[1]; ids without
    padding; the log-prob summed over real tokens; `cut` where the response ran out before an EOS (0)."""
    out = dict(a=torch.tensor([[5, 0, 1], [6, 7, 8]]), a_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
               b=torch.tensor([[9, 1, 1], [3, 0, 1]]), b_mask=torch.tensor([[1, 0, 0], [1, 1, 0]]),
               a_logps=torch.tensor([[-1.0, -0.5, 0.0], [-1.0, -1.0, -1.0]]),
               b_logps=torch.tensor([[-2.0, 0.0, 0.0], [-0.25, -0.25, 0.0]]), src=[("pi+", "pi-"), ("pi", "pi_ref")])
    a, b = responses(Words(), out, "a", [0]), responses(Words(), out, "b", [0])
    assert [(r.text, r.ids, r.src, r.logp, r.cut) for r in a] == [("w5 w0", [5, 0], "pi+", -1.5, False),
                                                                    ("w6 w7 w8", [6, 7, 8], "pi", -3.0, True)]
    assert [(r.text, r.ids, r.src, r.logp, r.cut) for r in b] == [("w9", [9], "pi-", -2.0, True),
                                                                    ("w3 w0", [3, 0], "pi_ref", -0.5, False)]
