"""`stillhouse demo`: the whole loop on one machine, from a logged teacher to a rollout verdict.

1. stack: the inference server, the A/B router (its only live arm the few-shot teacher) and
   Prometheus when installed;
2. teacher traffic: simulated users call the router with lorax-client and the openai client and
   score answers through ``POST /feedback``; every exchange lands in the request log;
3. distil: the dataset is built from the router's request log, curated, a zero-shot LoRA student
   trained in a servable shape and registered; teacher and student are scored on held-out gold rows;
4. A/B test: the student joins the route as a candidate and ``abtest watch`` ramps it while more
   traffic and feedback flow;
5. verdict: the watch's last analysis again with its history, the HTML report, the Grafana
   dashboards, and a summary.

``plan`` holds the sizes (``--quick``: the tiny model, minutes; full: gemma-3-270m), ``users``
the simulated clients, ``recipe`` the stages, ``summary`` what is printed at the end.
"""
