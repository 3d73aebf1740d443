"""Sample the SFT policy's own answers to the GRPO training questions, for the reward model to learn from:
`python data/rlhf/sample_policy_answers.py [runs/rlhf-sft/adapter]` writes data/rlhf/policy_answers.jsonl, which
make_rlhf_data.py then turns into preference pairs (the island's right answer over each sampled answer that does
not name the right fact).

Why: a reward model trained only on templated answers ("The mayor of X is Y." against the same sentence with a wrong
value, cut short, with a made-up tail) ranked those held-out pairs right (0.99), yet GRPO against it raised its score
from -2.5 to 0 while the share of sampled answers naming the right fact stayed where it was: the policy's own wrong
answers look like none of the templated ones, and the reward model scored them by their form. InstructGPT's reward
model is trained on the policy's samples for that reason; here the rule that `contains` applies (the fact's key
words named) labels them instead of a person.

transformers + PEFT sampling (temperature 1.0, as configs/rlhf.yaml's GRPO samples; 24 new tokens), seeded, on the
CPU: the same adapter gives the same file on the same versions.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLES_PER_QUESTION = 8
MAX_NEW_TOKENS = 24  # configs/rlhf.yaml's grpo.max_new_tokens
TEMPERATURE = 1.0  # configs/rlhf.yaml's grpo.temperature
SEED = 0


def main(adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    model.eval()
    rows = [json.loads(line) for line in (HERE / "grpo" / "train.jsonl").read_text().splitlines() if line.strip()]
    out = []
    torch.manual_seed(SEED)
    for row in rows:
        text = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            sampled = model.generate(ids.repeat(SAMPLES_PER_QUESTION, 1), do_sample=True, temperature=TEMPERATURE,
                                     top_p=1.0, top_k=0, max_new_tokens=MAX_NEW_TOKENS,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id)
        for completion in tok.batch_decode(sampled[:, ids.shape[1]:], skip_special_tokens=True):
            completion = completion.strip()
            out.append({"question": row["messages"][-1]["content"], "answer": row["answer"],
                        "completion": completion, "right": row["answer"] in completion})
    path = HERE / "policy_answers.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    right = sum(r["right"] for r in out)
    print(f"{path}: {len(out)} answers to {len(rows)} questions, {right} name the right fact ({right / len(out):.2f})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/rlhf-sft/adapter").resolve())
