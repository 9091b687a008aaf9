"""One exception type for every bad input a user can give Keel.

The CLI prints ``keel: error: <message>`` on one line and exits with code 2
(no traceback unless ``--debug``). Messages name the file / key / row and say
what is wrong, e.g. ``config key 'actor_rollout_ref.actor.entropy_coef' is
unknown (did you mean 'entropy_coeff'?)``.
"""

EXIT_BAD_INPUT = 2  # config, data, model dir, checkpoint, reward function
EXIT_HEALTH_STOP = 3  # the monitor stopped the run (action: stop)
EXIT_NONFINITE_STOP = 4  # too many non-finite updates in a row


class KeelError(Exception):
    """A user-facing error: one clear line, exit code 2."""
