"""The best-checkpoint score (SPEC §8)."""
from overnight.train.scoring import BestTracker


def test_a_better_eval_wins_after_the_same_training():
    best = BestTracker()
    for loss in [2.0] * 20:
        best.add_train_loss(loss)
    assert best.offer(10, best.score(1.5)["score"], 1.5)
    assert not best.offer(20, best.score(1.8)["score"], 1.8)
    assert best.best_step == 10


def test_grpo_a_falling_training_reward_does_not_make_a_worse_eval_the_best():
    """grpo tracks minus the sampled reward and evaluates minus the greedy reward: with the overfitting gap, a
    training reward that fell between two evals narrowed the gap enough that the worse eval (val_loss 0.31 -> 0.43,
    as measured in an RLHF run) was taken as the new best, and its adapter shipped as the run's."""
    def run(overfit_gap):
        best = BestTracker()
        for reward in [1.5] * 16:
            best.add_train_loss(-reward)
        first = best.offer(16, best.score(0.31, overfit_gap)["score"], 0.31)
        for reward in [-1.0] * 16:  # the sampled answers got worse
            best.add_train_loss(-reward)
        return first, best.offer(32, best.score(0.43, overfit_gap)["score"], 0.43)

    assert run(overfit_gap=True) == (True, True)  # what the likelihood methods' rule does with grpo's figures
    assert run(overfit_gap=False) == (True, False)
