"""The outside world, all non-critical (SPEC §8: a failure is one warning and the run goes on): `notify` (webhook
POSTs on one ordered sender thread), `trackers` (TensorBoard and Weights & Biases, fed every metrics event) and
`cloud` (the RunPod volume warning, keeping a Mac awake with caffeinate)."""
