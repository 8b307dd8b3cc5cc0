"""`serve-kit rollout` and `serve-kit route`: drive running servers through the route management API
and judge a candidate from their /metrics. Knows no backend (DESIGN.md "Where this round's parts go")."""
