"""The one exception type rankshare raises for problems a user can fix."""


class RankshareError(ValueError):
    """A bad config, a model that does not fit an adapter, or an adapter file that does not fit a model.

    The message says what was wrong and what to do; catch this class to handle all of them.
    """
