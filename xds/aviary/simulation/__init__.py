"""``aviary simulate``: the real engine replayed over recorded metrics on a simulated clock."""
