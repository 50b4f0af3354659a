"""The web dashboard every node serves at ``/ui``: a short history of its own
metrics (``history``, pure; ``sampler``, the loop that feeds it), the JSON
routes the page reads (``routes``), and the page itself (``static/``)."""
