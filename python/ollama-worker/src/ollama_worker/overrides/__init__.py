"""Every override of Celery, kombu, py-amqp, celery-singleton and llama-cpp-python internals
in the fleet: the one list to check on an upgrade. The worker's live in this package
(``create_app`` wires them; ``avocado-embedded-llm`` runs ``llama_server``), those a producer
needs too in ``avocado_shared.overrides``. All were written against Celery 5.7.0, kombu
5.7.0, py-amqp 5.4.2, celery-singleton 0.3.1 and llama-cpp-python 0.3.36. Each entry: where, what
it changes and why, and the tests (under ``tests/``) that pin it.

``consumer.DeadLetteringConsumer``: ``on_decode_error``, ``on_unknown_message``, ``on_invalid_task``
    Celery acks an undecodable message (lost) and rejects other poison without a reason:
    each is copied to ``ml.dlx`` with its reason, then acked.
    integration/test_dead_letter.py::test_poison_is_dead_lettered_with_its_reason_and_the_worker_keeps_serving

``consumer.DeadLetteringConsumer.on_unknown_task``
    The same, and the job fails in the result backend, so a waiting client fails now.
    integration/test_dead_letter.py::test_unknown_task_fails_a_waiting_client_at_once

``consumer.DeadLetteringConsumer.create_task_handler``
    Celery's consumer dies ("Unrecoverable error") on a task message without an ``id`` or
    whose body is not ``[args, kwargs, embed]``: such a message is dead-lettered instead.
    integration/test_dead_letter.py::test_poison_is_dead_lettered_with_its_reason_and_the_worker_keeps_serving
    (its cases ``task-without-id``, ``body-not-a-triple``, ``body-a-number``)

``consumer.DeadLetteringConsumer.create_task_handler`` (forwarding)
    A job that arrives on ``ml.generate``, ``ml.summarize`` or ``ml.embed`` (plain AMQP, an earlier
    release) is forwarded to its model's lane queue (``ollama_worker.forward``), not run by
    a node that may not serve its model.
    integration/test_plain_amqp.py::test_job_from_a_plain_amqp_client_runs_and_is_stored

``consumer.DeadLetteringConsumer.Blueprint.default_steps``
    Celery's ``DelayedDelivery`` step left out of the consumer: it declares 28 exchanges and
    queues at every start, which a least-privilege broker user may not
    (``create_app`` adds ``delayed_delivery.DelayedDelivery`` where the worker declares).
    integration/test_admin.py::test_worker_user_runs_jobs_retries_and_announces

``delayed_delivery.DelayedDelivery.start``
    Celery's step, declaring on the consumer's live broker only: Celery's tries every URL of
    a failover list, a dead node four times over some 17 s, while the consumer waits.
    integration/test_cluster.py::test_a_node_killed_while_jobs_run_loses_none_and_rejoins

``prompt_shutdown.PromptShutdown``
    A socket on the consumer's event loop (``c.hub``), written at ``worker_shutting_down``:
    Celery's SIGTERM handler only sets a flag the loop reads at its next timer.
    unit/test_prompt_shutdown.py::test_the_shutdown_of_its_own_worker_wakes_the_event_loop
    integration/test_reliability.py::test_sigterm_finishes_the_running_job_and_leaves_the_rest_queued

``job_task.TracedJob.__call__``
    Runs the job without ``Task.__call__``, which would push a request without the job's id
    over the one Celery's tracer pushed; it runs in the job's span, in the trace its message's
    headers carry (``ollama_worker.tracing.job_span``).
    integration/test_results.py::test_results_are_stored_and_read_back
    integration/test_tracing.py::test_one_trace_covers_request_publish_run_and_model_call

``job_task.TracedJob``: ``on_success``, ``on_failure``
    celery-singleton releases the lock after Celery published the outcome, so a producer
    resubmitting at once finds it held: the job releases it (and records a failure) before,
    and these hooks only redo what it could not.
    integration/test_reliability.py::test_redis_restart_loses_no_job_and_runs_none_twice
    integration/test_reliability.py::test_bad_request_fails_once_with_a_clear_reason

``httpx_cli.leave_out``: ``httpx._main``
    httpx 0.28 imports its command line (click, rich, pygments: some 8 MB) whenever they are
    installed, as on Colab: a worker (``ollama_worker.app``) marks it absent before httpx
    loads, and httpx takes the stub it has for an install without them.
    unit/test_overrides.py::test_a_worker_leaves_httpx_s_command_line_out

``llama_server.plain_buffers``: ``llama_cpp.llama_model_default_params``
    llama-cpp-python 0.3.36's server, as ``avocado-embedded-llm`` runs it, with llama.cpp's
    extra buffer types off: on a CPU with AMX its AMX matrix product crashes the server at
    the first token of the embedded chat model.
    unit/test_embedded.py::test_the_server_keeps_the_weights_out_of_the_amx_buffers
    integration/test_real_model.py::test_prompt_chat_and_json_jobs_on_the_real_model

``job_task.TracedJob.singleton_backend``
    celery-singleton keeps one lock store per process, the first app's, never closed: here
    it is the worker's (``Resources.lock_store``), closed with the worker's other clients.
    unit/test_overrides.py::test_a_stopped_worker_closes_its_lock_store

``avocado_shared.overrides.singleton.SingletonJob``: ``apply_async``, ``generate_lock``
    Locks keyed on a job's identity; a retry publishes as a plain task (celery-singleton's
    finds its own lock and the job stops in RETRY); a publish with an unknown outcome is
    sent again under the same job id.
    integration/test_reliability.py::test_singleton_job_really_retries_after_busy_answers
    integration/test_reliability.py::test_generate_with_idempotency_key_is_not_queued_twice
    integration/test_flow_control.py::test_a_confirm_that_never_comes_is_an_unknown_outcome_and_no_second_copy

``avocado_shared.overrides.singleton.SingletonJob``: ``release_lock``, ``before_start``
    Release and refresh only a lock the job still holds, and push its expiry back when the
    job starts: celery-singleton deletes whoever's lock it finds, and may set none.
    integration/test_reliability.py::test_duplicate_summary_while_running_shares_one_execution

``avocado_shared.overrides.result_backend.FleetRedisBackend._store_result``
    Celery's Redis result backend reads a job's meta (GET: a SUCCESS is never overwritten),
    then writes and publishes it (MULTI/SETEX/PUBLISH/EXEC): one script does all three, one
    round trip per outcome (``override_backends`` in ``celery_config``).
    integration/test_result_backend.py::test_a_success_is_never_overwritten
    integration/test_result_backend.py::test_an_outcome_is_stored_with_its_expiry_and_published

``avocado_shared.overrides.result_backend.FleetResultConsumer._reconnect_pubsub``
    When Redis dropped a waiter's subscription, Celery reads the results stored meanwhile,
    then subscribes again: a result published between the two reaches no one. This
    subscribes first.
    integration/test_result_backend.py::test_a_result_stored_while_its_waiter_reconnects_reaches_it

``avocado_shared.overrides.result_backend.FleetResultConsumer._reconnect``,
``drain_events``, ``_flush_pending_unsubscribe``
    Redis away past Celery's three reconnect attempts: Celery logs CRITICAL ("must be
    restarted") and raises RuntimeError to the waiter, and to ``AsyncResult.__del__`` of
    each handle dropped meanwhile. Here a waiter tries again at each poll until its own
    timeout, and a dropped handle's unsubscribe gives up at once (the lost connection took
    the subscription along).
    integration/test_result_backend.py::test_a_waiter_waits_through_a_redis_restart_and_gets_its_result
    integration/test_result_backend.py::test_a_handle_dropped_while_redis_is_away_goes_quietly_and_waiters_still_hear

``avocado_shared.overrides.singleton``: ``SingletonJob.singleton_backend``,
``new_lock_store``, ``close_lock_store``
    Each task's lock store of its own app, closable (a ``Producer`` closes its own;
    celery-singleton's ``RedisBackend`` has no ``close``: its ``redis`` is closed).
    unit/test_overrides.py::test_a_stopped_worker_closes_its_lock_store

``avocado_shared.overrides.flow_transport``: ``FlowConnection``, ``FlowTransport``,
``FlowSSLTransport``
    py-amqp drops the reason of ``connection.blocked`` and lets a blocked publish wait out its
    confirm: the reason is kept (``_METHODS``, ``_on_blocked``, ``_on_unblocked``) and a
    producer's publish raises ``BrokerBlocked`` at once.
    integration/test_flow_control.py::test_an_alarm_fails_publishers_fast_and_each_job_runs_once
    unit/test_flow.py::test_only_amqp_urls_get_the_flow_aware_transport

``avocado_shared.overrides.failover``: ``FailoverConnection._init_params``, ``FailoverAMQP``
    kombu writes the first node's host name into the TLS options every connection shares:
    each connection gets its own copy, so each node is checked against its own name.
    integration/test_tls.py::test_failover_checks_each_brokers_own_host_name

unit/test_overrides.py::test_every_override_is_in_an_overrides_package keeps this list whole.
"""

from __future__ import annotations

__all__: list[str] = []
