"""The jobs that run several processes on one machine: `rpo run` (main_job: every service, then training and
evaluation, then the summary) and `rpo eval` (eval_job: a replica started when none is configured), both on
the child-process supervision of `processes`."""
