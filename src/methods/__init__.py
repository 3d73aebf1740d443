"""The training methods (SPEC §9). `objectives` writes each method's objective and its normalisation over a step
once, with a numpy reference both backends are held to; `grpo` is GRPO's batch source (sample a group per prompt,
score it, advantages, replay for grpo.iterations) and its validator; `rewards` loads and runs the reward
functions (built-ins, `module:function`, `file.py:function`)."""
