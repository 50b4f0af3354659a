"""What a replica does, locally (``local``) or over internode verbs (``internode``),
and how a coordinator reaches one (``client``, ``router``)."""
