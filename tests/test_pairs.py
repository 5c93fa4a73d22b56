"""The labelled pair's tensors: collate against tensors built by hand."""
import torch

from pairs import Pair, collate

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
