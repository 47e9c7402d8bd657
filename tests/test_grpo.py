"""GRPO's pure functions against hand computations, the reward set, and a toy task a tiny model learns."""

from __future__ import annotations

import math

import pytest
import torch

from lorapar import dist, grpo, rewards
from lorapar.data import Example
from lorapar.loss import target_logprobs

# A hand-made batch: 2 completions of 3 / 2 tokens (the last entry of row 1 is padding).
LOGP = [[-1.0, -0.5, -2.0], [-0.2, -1.5, -9.0]]
OLD = [[-1.3, -0.5, -1.0], [-0.1, -1.0, -9.0]]
REF = [[-1.1, -0.7, -1.5], [-0.4, -1.2, -9.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -0.5]
EPS, EPS_HIGH, BETA, MAX_LEN = 0.2, 0.28, 0.1, 4


def hand_token_losses(eps_high: float, beta: float) -> list[list[float]]:
    """-min(r A, clip(r) A) + beta (exp(ref - logp) - (ref - logp) - 1), one float at a time."""
    out = []
    for i in range(2):
        row = []
        for t in range(3):
            if not MASK[i][t]:
                continue
            r = math.exp(LOGP[i][t] - OLD[i][t])
            clipped = min(max(r, 1 - EPS), 1 + eps_high)
            loss = -min(r * ADV[i], clipped * ADV[i])
            d = REF[i][t] - LOGP[i][t]
            row.append(loss + beta * (math.exp(d) - d - 1))
        out.append(row)
    return out


def tensors():
    return (
        torch.tensor(LOGP, dtype=torch.float64),
        torch.tensor(OLD, dtype=torch.float64),
        torch.tensor(REF, dtype=torch.float64),
        torch.tensor(MASK, dtype=torch.bool),
        torch.tensor(ADV, dtype=torch.float64),
    )


@pytest.mark.parametrize("beta", [0.0, BETA])
@pytest.mark.parametrize("eps_high", [None, EPS_HIGH])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_matches_hand_computation(loss_type, eps_high, beta):
    rows = hand_token_losses(EPS if eps_high is None else eps_high, beta)
    expected = {
        "grpo": sum(sum(r) / len(r) for r in rows) / 2,
        "dr_grpo": sum(map(sum, rows)) / (2 * MAX_LEN),
        "dapo": sum(map(sum, rows)) / sum(map(len, rows)),
        "bnpo": sum(map(sum, rows)) / sum(map(len, rows)),  # one micro-batch: its token mean
    }[loss_type]
    logp, old, ref, mask, adv = tensors()
    loss, stats = grpo.grpo_loss(
        logp,
        old,
        adv,
        mask,
        epsilon=EPS,
        epsilon_high=eps_high,
        beta=beta,
        ref_logp=ref,
        loss_type=loss_type,
        max_completion_len=MAX_LEN,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert stats["tokens"].item() == 5
    if beta:
        kl = sum(
            math.exp(REF[i][t] - LOGP[i][t]) - (REF[i][t] - LOGP[i][t]) - 1
            for i in range(2)
            for t in range(3)
            if MASK[i][t]
        )
        assert stats["kl_sum"].item() == pytest.approx(kl, rel=1e-12)


def test_clip_fraction_counts_tokens_whose_gradient_is_clipped():
    logp, old, ref, mask, adv = tensors()
    # ratios: row 0 exp(0.3)=1.35 (A>0: clipped), 1, exp(-1)=0.37 (A>0: not clipped);
    # row 1 exp(-0.1)=0.90 (A<0, inside), exp(-0.5)=0.61 (A<0: clipped).
    _, stats = grpo.grpo_loss(logp, old, adv, mask, epsilon=EPS)
    assert stats["clipped"].item() == 2


def test_bnpo_is_the_mean_of_the_micro_batches_token_means():
    """TRL 0.17-0.19's bnpo: each micro-batch is normalised by its own token count (3 and 2 here), then
    the micro-batches are averaged; unlike dapo, a split into micro-batches changes the loss."""
    rows = hand_token_losses(EPS, BETA)
    logp, old, ref, mask, adv = tensors()
    total = sum(
        grpo.grpo_loss(
            logp[r],
            old[r],
            adv[r],
            mask[r],
            epsilon=EPS,
            beta=BETA,
            ref_logp=ref[r],
            loss_type="bnpo",
            num_micro_batches=2,
        )[0].item()
        for r in (slice(0, 1), slice(1, 2))
    )
    assert total == pytest.approx((sum(rows[0]) / 3 + sum(rows[1]) / 2) / 2, rel=1e-12)
    assert total != pytest.approx(sum(map(sum, rows)) / 5, rel=1e-6)


def test_split_into_micro_batches_gives_the_same_gradient():
    logp, old, ref, mask, adv = tensors()
    for loss_type in ("grpo", "dr_grpo", "dapo"):  # bnpo depends on the split by definition (test above)
        whole = logp.clone().requires_grad_()
        grpo.grpo_loss(
            whole, old, adv, mask, epsilon=EPS, beta=BETA, ref_logp=ref, loss_type=loss_type, max_completion_len=MAX_LEN
        )[0].backward()
        parts = logp.clone().requires_grad_()
        for rows in (slice(0, 1), slice(1, 2)):
            grpo.grpo_loss(
                parts[rows],
                old[rows],
                adv[rows],
                mask[rows],
                epsilon=EPS,
                beta=BETA,
                ref_logp=ref[rows],
                loss_type=loss_type,
                max_completion_len=MAX_LEN,
                num_sequences=2,
                num_tokens=5.0,
            )[0].backward()
        torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-12, atol=1e-12)


def test_group_advantages_with_and_without_std_scaling():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    scaled = grpo.group_advantages(r, 3)
    torch.testing.assert_close(scaled, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1.0 + 1e-4))
    torch.testing.assert_close(grpo.group_advantages(r, 3, scale=False), torch.tensor([-1.0, 0, 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="groups of 4"):
        grpo.group_advantages(r, 4)


def test_k3_is_zero_at_equality_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -1.0, -1.0])
    kl = grpo.k3_kl(logp, torch.tensor([-1.0, -0.5, -3.0]))
    assert kl[0] == 0 and (kl[1:] > 0).all()


def test_rollouts_do_not_depend_on_which_prompts_share_the_batch(tiny_model):
    """Each prompt's seed fixes its group: two calls of one prompt each (two ranks) give what one call
    of both gives, although the batch, its padding and its shrinking as rows stop all differ."""
    args = grpo.GRPOArgs(num_generations=4, max_completion_len=6, temperature=1.0)
    prompts, seeds = [[1, 5, 9, 2], [1, 11]], [grpo.derive_seed(0, 3, 0), grpo.derive_seed(0, 3, 1)]

    def score(_, completions):
        return torch.tensor([[float(len(c))] for c in completions])

    common = dict(eos_id=20, pad_id=0)
    both = grpo.make_rollouts(tiny_model, prompts, score, torch.ones(1), args, seeds=seeds, **common)
    alone = [
        grpo.make_rollouts(tiny_model, [p], score, torch.ones(1), args, seeds=[s], **common)
        for p, s in zip(prompts, seeds)
    ]
    tokens = lambda r: [row[row != 0].tolist() for row in r.input_ids]  # noqa: E731
    assert tokens(both) == tokens(alone[0]) + tokens(alone[1])
    assert torch.equal(both.advantages, torch.cat([a.advantages for a in alone]))
    assert len(set(map(tuple, tokens(both)[:4]))) > 1  # the group's completions differ from one another
    assert both.total_reward.std() > 0  # some rows stopped at eos_id, so the batch shrank while sampling


def test_rollouts_stop_at_every_stop_id_not_only_eos(tiny_model):
    """A ChatML model ends its turn with <|im_end|>, not EOS: every id in stop_ids ends a completion."""
    args = grpo.GRPOArgs(num_generations=2, max_completion_len=6, temperature=1.0)
    vocab = tiny_model.args.vocab_size

    def lengths(**kwargs):
        rollouts = grpo.make_rollouts(
            tiny_model,
            [[1, 5, 9]],
            lambda _, c: torch.zeros(len(c), 1),
            torch.ones(1),
            args,
            seeds=[7],
            eos_id=None,
            pad_id=0,
            **kwargs,
        )
        return rollouts.completion_lengths

    assert lengths() == [6, 6]  # no stop: full length
    assert lengths(stop_ids=list(range(vocab))) == [1, 1]  # every token is a stop: one token each


# ----------------------------------------------------------------------------- rewards


GOOD = "<reasoning>\nStep one.\nStep two.\n</reasoning>\n<answer>\n1,000\n</answer>\n"


def example(final="1000"):
    return Example(question="q", answer=f"... #### {final}", final=final, system=2, source={})


# A direct transcription of example.py's reward functions (one completion at a time, without TRL's
# chat wrapping), the reference the built-ins must reproduce.
def authors_extract_xml_answer(text):
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def authors_rewards(text, gold):
    import re

    extracted = authors_extract_xml_answer(text)
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    strict = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
    soft = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    return {
        "correct": 2.0 if extracted == gold else 0.0,
        "integer": 0.5 if extracted.isdigit() else 0.0,
        "strict_format": 0.5 if re.match(strict, text, flags=re.DOTALL) else 0.0,
        "soft_format": 0.5 if re.match(soft, text.strip(), flags=re.DOTALL) else 0.0,
        "xml_count": count,
    }


R, A = "<reasoning>\n", "\n</reasoning>\n<answer>\n"
# (completion, gold answer text after "####", the rewards by hand: correct, integer, strict, soft, xml_count)
REWARD_TABLE = [
    (R + "2+2=4" + A + "4\n</answer>\n", "4", (2.0, 0.5, 0.5, 0.5, 0.5)),
    (R + "one\ntwo\nthree" + A + "18\n</answer>\n", "18", (2.0, 0.5, 0.5, 0.5, 0.5)),  # multi-line: DOTALL
    # no final newline: not strict, and count_xml charges the whole text (51 chars) as "after </answer>\n"
    (R + "2+2=4" + A + "4\n</answer>", "4", (2.0, 0.5, 0.0, 0.5, 0.25 + 0.125 - 0.051 + 0.125 + 0.001)),
    (R + "2+2=4" + A + "4\n</answer>\n\n", "4", (2.0, 0.5, 0.5, 0.5, 0.498)),  # $ takes one more newline
    (R + "x" + A + "4\n</answer>\nbye", "4", (2.0, 0.5, 0.0, 0.5, 0.5 - 0.003 - 0.003)),
    (R + "x" + A + "5\n</answer>\n", "4", (0.0, 0.5, 0.5, 0.5, 0.5)),  # wrong number
    (R + "x" + A + "1,000\n</answer>\n", "1000", (0.0, 0.0, 0.5, 0.5, 0.5)),  # compared as strings
    (R + "x" + A + "1000.0\n</answer>\n", "1000", (0.0, 0.0, 0.5, 0.5, 0.5)),
    (R + "x" + A + "-3\n</answer>\n", "-3", (2.0, 0.0, 0.5, 0.5, 0.5)),  # "-3".isdigit() is False
    (R + "x" + A + "$4\n</answer>\n", "4", (0.0, 0.0, 0.5, 0.5, 0.5)),
    (R + "x" + A + "3\n</answer>\n<answer>\n4\n</answer>\n", "4", (2.0, 0.5, 0.5, 0.5, 0.25)),  # the last block
    (R + "x" + A + "4\n</answer>\n<answer>\n3\n</answer>\n", "4", (0.0, 0.5, 0.5, 0.5, 0.25)),
    ("  \n" + R + "x" + A + "4\n</answer>\n", "4", (2.0, 0.5, 0.0, 0.5, 0.5)),  # soft strips, strict does not
    ("Sure! " + R + "x" + A + "4\n</answer>\n", "4", (2.0, 0.5, 0.0, 0.0, 0.5)),  # soft is anchored at the start
    ("<reasoning>x</reasoning><answer>4</answer>", "4", (2.0, 0.5, 0.0, 0.5, 0.0)),
    ("<reasoning>x</reasoning>\n\n<answer> 4 </answer>", "4", (2.0, 0.5, 0.0, 0.5, 0.0)),
    ("The answer is 4.", "4", (0.0, 0.0, 0.0, 0.0, 0.0)),  # no tag: the whole text is compared
    ("4", "4", (2.0, 0.5, 0.0, 0.0, 0.0)),
    ("#### 4", "4", (0.0, 0.0, 0.0, 0.0, 0.0)),  # "####" does not count in GRPO
    (R + "x" + A + "4", "4", (2.0, 0.5, 0.0, 0.0, 0.25 + 0.125 - 0.037)),  # cut off before </answer> (37 chars)
    ("", "4", (0.0, 0.0, 0.0, 0.0, 0.0)),
    (R + "x\n</reasoning>\n" + R + "y" + A + "4\n</answer>\n", "4", (2.0, 0.5, 0.5, 0.5, 0.25)),  # two of each
]
NAMES = ("correct", "integer", "strict_format", "soft_format", "xml_count")


@pytest.mark.parametrize("completion, gold, expected", REWARD_TABLE)
def test_default_rewards_are_example_py_s(completion, gold, expected):
    """The default reward set, weighted, gives each completion what example.py's functions give it."""
    ex = Example(question="q", answer=f"steps\n#### {gold}", final=gold, system=2, source={})
    weighted = {name: w * fn(completion, ex) for name, fn, w in rewards.parse_spec(rewards.DEFAULT_SPEC)}
    assert weighted == pytest.approx(authors_rewards(completion, gold), abs=1e-12)
    assert weighted == pytest.approx(dict(zip(NAMES, expected)), abs=1e-12)


def test_gold_string_is_example_py_s_extract_hash_answer():
    ex = Example(question="q", answer="a lot\n#### $1,000.50", final="1000.5", system=2, source={})
    assert rewards.gold_string(ex) == "1000.50"
    assert rewards.correct("<answer>\n1000.50\n</answer>", ex) == 1.0
    assert rewards.correct("<answer>\n1000.5\n</answer>", ex) == 0.0  # strings, not numbers
    assert rewards.correct_lenient("<answer>\n1000.5\n</answer>", ex) == 1.0


def test_lenient_variants_keep_their_own_names():
    text = "The answer is 1000. <answer>1000</answer> trailing"
    assert rewards.correct_lenient(text, example()) == 1.0
    assert rewards.correct_lenient(GOOD, example()) == 1.0  # "1,000" == "1000" after normalisation
    assert rewards.correct(GOOD, example()) == 0.0
    assert rewards.soft_format_lenient(text, example()) == 0.0
    assert rewards.soft_format_lenient("Sure! <reasoning>x</reasoning><answer>4</answer>", example()) == 1.0
    assert rewards.soft_format("Sure! <reasoning>x</reasoning><answer>4</answer>", example()) == 0.0
    no_newline = GOOD.rstrip("\n")
    assert rewards.strict_format_lenient(no_newline, example()) == 1.0
    assert rewards.strict_format(no_newline, example()) == 0.0


def test_lenient_correct_reward_reads_the_answer_that_lenient_evaluation_scores():
    """correct_lenient and --extraction lenient are one rule: with two answers, the first counts for both."""
    from lorapar.eval_tasks import score_gsm8k

    text = "<reasoning>\n6*2=12\n</reasoning>\n<answer>\n12\n</answer>\n<answer>\n13\n</answer>\n"
    for final, right in (("12", 1.0), ("13", 0.0)):
        assert rewards.correct_lenient(text, example(final)) == right
        assert score_gsm8k([example(final)], [text], "lenient")["metrics"]["correct"] == right
    # the authors' rules read the last block, in GRPO and in evaluation after RL alike
    for final, right in (("12", 0.0), ("13", 1.0)):
        assert rewards.correct(text, example(final)) == right
        assert score_gsm8k([example(final)], [text], "last_answer")["metrics"]["correct"] == right


def test_reward_spec_errors_and_user_functions():
    [(name, fn, weight)] = rewards.parse_spec("math:isfinite=0.25")
    assert fn is math.isfinite and weight == 0.25
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        rewards.parse_spec("nope=1")
    with pytest.raises(ValueError, match="cannot import"):
        rewards.parse_spec("no_such_module_xyz:f=1")
    with pytest.raises(ValueError, match="not a number"):
        rewards.parse_spec("correct=two")


# ----------------------------------------------------------------------------- a task a tiny model learns


def test_tiny_model_learns_to_emit_the_rewarded_token(tiny_model):
    """Reward = share of completion tokens equal to TARGET; the mean reward must rise within 20 CPU steps."""
    from lorapar.lora import LoraArgs, apply_lora
    from lorapar.optim import MaskedAdamW

    TARGET = 7
    with torch.no_grad():  # peaked logits: with N(0, 0.02) the output layer caps any token near 3% probability
        tiny_model.output.weight.mul_(20)
    apply_lora(tiny_model, LoraArgs(r=4, alpha=8.0, targets=("q", "v", "gate", "up", "down")))
    optimizer = MaskedAdamW.for_model(tiny_model, lr=3e-2, weight_decay=0.0)
    args = grpo.GRPOArgs(num_generations=8, max_completion_len=4, beta=0.0, micro_batch=16)
    prompts = [[1, 5, 9], [1, 11]]

    def score(_, completions):
        return torch.tensor([[sum(t == TARGET for t in c) / len(c)] for c in completions])

    history = []
    for step in range(20):
        seeds = [grpo.derive_seed(step, i) for i in range(len(prompts))]
        rollouts = grpo.make_rollouts(
            tiny_model, prompts, score, torch.ones(1), args, seeds=seeds, eos_id=None, pad_id=0
        )
        history.append(rollouts.total_reward.mean().item())
        grpo.grpo_update(tiny_model, optimizer, rollouts, args, dist.DistInfo(), lrs=[3e-2])
    assert history[0] < 0.1 and sum(history[-5:]) / 5 > 0.6, history


def test_old_and_reference_logprobs_are_those_of_the_sampling_policy_without_dropout(tiny_model):
    """The rollouts were sampled in eval mode; with LoRA dropout the old/reference log-probs must be too."""
    from lorapar.lora import LoraArgs, apply_lora, disable_adapter
    from lorapar.optim import MaskedAdamW

    apply_lora(tiny_model, LoraArgs(r=4, dropout=0.5, init="gaussian", init_std=0.5))
    tiny_model.train()
    args = grpo.GRPOArgs(num_generations=2, max_completion_len=3, beta=0.1, mu=2, micro_batch=4)
    rollouts = grpo.make_rollouts(
        tiny_model,
        [[1, 5, 9], [1, 11]],
        lambda _, c: torch.rand(len(c), 1),
        torch.ones(1),
        args,
        seeds=[1, 2],
        eos_id=None,
        pad_id=0,
    )
    with torch.no_grad():
        tiny_model.eval()
        expected_old = target_logprobs(tiny_model, rollouts.input_ids, rollouts.labels)[0]
        with disable_adapter(tiny_model):
            expected_ref = target_logprobs(tiny_model, rollouts.input_ids, rollouts.labels)[0]
        tiny_model.train()
    optimizer = MaskedAdamW.for_model(tiny_model, lr=1e-3)
    grpo.grpo_update(
        tiny_model,
        optimizer,
        rollouts,
        args,
        dist.DistInfo(),
        lrs=[1e-3, 1e-3],
        reference=lambda: disable_adapter(tiny_model),
    )
    assert torch.equal(rollouts.old_logp, expected_old) and torch.equal(rollouts.ref_logp, expected_ref)
    assert tiny_model.training


def test_derived_seeds_differ_for_distinct_tuples():
    pairs = [((0, 3, 0), (0, 3)), ((7, 2), (7, 2, 0, 0)), ((2**32 + 5, 9), (5, 1, 9)), ((-1,), (2**32 - 1, 2**32 - 1))]
    for a, b in pairs:
        assert grpo.derive_seed(*a) != grpo.derive_seed(*b), (a, b)
    assert grpo.derive_seed(1, 2) == grpo.derive_seed(1, 2) < 2**64


def test_pack_right_pads_prompt_and_completion_with_loss_on_the_completion_only():
    """GRPO's rollout rows go through the one collator: prompt + completion, right-padded with pad_id,
    labels -100 on the prompt and the padding."""
    input_ids, labels = grpo.pack([[1, 5], [1, 6, 7]], [[8, 9, 2], [3]], pad_id=0)
    assert input_ids.dtype == labels.dtype == torch.long
    assert input_ids.tolist() == [[1, 5, 8, 9, 2], [1, 6, 7, 3, 0]]
    assert labels.tolist() == [[-100, -100, 8, 9, 2], [-100, -100, -100, 3, -100]]
