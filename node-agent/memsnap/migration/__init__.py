"""Live migration between nodes, agent to agent (docs/architecture.md, "Live migration").

    planner   when to stop pre-copying: predicted pause, auto-converge, timeouts
    transfer  layers over HTTPS: streamed, rate-limited, resumable, checked
    source    the source half: rounds, the pause, the hand-over, rollback
    target    the target half: receive, restore, hold until committed, or remove every trace
    throttle  auto-converge's CPU throttle (cgroup cpu controller)
    api       the agent's endpoints for both halves
    client    calling them (`memsnap migrate`)
"""
