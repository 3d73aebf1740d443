"""The one training loop and what it needs step by step, all framework-free: `loop` (the visible loop, its
side-effect object and batch-source protocol), `schedule` (learning rate as a pure function of the step),
`stopping` (early stopping and the circuit breakers), `scoring` (the best-checkpoint score), `validation`
(lazy, fixed-subset, token-weighted validation loss) and `progress` (the one-line progress bar, ETA, memory
health, eval and checkpoint lines). It never touches the run directory's layout itself: it is handed an object
for its side effects (files, checkpoints, notifications, console) by overnight.runs."""
