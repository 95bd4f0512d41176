"""Training one member (`loop`, run by `accelerate launch -m members.train.loop`) and the baselines a
member has to beat (`baselines`)."""
