"""An exact global step for bias-corrected optimizers under asynchronous applies.

Adam's bias correction needs t, the number of updates applied including this
one. Keras reads ``optimizer.iterations + 1``; when several parameter-server
workers apply concurrently two of them read the same value. ``ExactGlobalStep``
keeps its own int64 ``global_step`` and bumps it once per apply with the raw
``tf.Variable.assign_add`` (an atomic increment, also on a parameter server),
handing the value that call returns to every variable's update.

Seam: ``TFOptimizer._distributed_tf_update_step`` (see tf_async/_keras_fit.py,
"optimizers seams").
"""

from __future__ import annotations

from tf_async import _keras_fit


class ExactGlobalStep:
    """Mixin for ``keras.optimizers.Optimizer`` subclasses (TF backend).

    The subclass calls ``_build_global_step()`` at the end of ``build`` and
    implements ``_update_step_at(gradient, variable, learning_rate, step)``.
    """

    def _build_global_step(self) -> None:
        self._global_step = self.add_variable(
            shape=(), dtype="int64", initializer="zeros", aggregation="none",
            name="global_step",
        )

    @property
    def global_step(self):
        """Exact number of applied updates (bias-correction step)."""
        return self._global_step

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        step = _keras_fit.raw_variable(self._global_step).assign_add(1)

        def apply_grad_to_update_var(var, grad, learning_rate, step):
            return self._update_step_at(grad, var, learning_rate, step)

        for grad, var in grads_and_vars:
            distribution.extended.update(
                var, apply_grad_to_update_var, args=(grad, learning_rate, step),
                group=False,
            )

    def update_step(self, gradient, variable, learning_rate):
        """Fallback for callers outside the TF distributed update path."""
        return self._update_step_at(gradient, variable, learning_rate, self.iterations + 1)
