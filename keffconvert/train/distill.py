"""Knowledge distillation from the original while the converted model fine-tunes."""

import keras
from keras import ops

from keffconvert.train.feature_distill import feature_loss, matching_layers, tapped


@keras.saving.register_keras_serializable(package="keffconvert")
class Distiller(keras.Model):
    """Trains `student` on (1 - weight) * cross-entropy + weight * T**2 * KL(teacher_T || student_T),
    plus feature_weight * the relative error of its block outputs (`keffconvert.feature_distill`).

    The teacher (the original model, frozen) is run in inference mode on the same augmented batch.
    Outputs may be probabilities (softmax) or logits: probabilities are turned into logits by a
    log, which a softmax undoes exactly. Validation loss is the plain cross-entropy, so it is
    comparable with a model trained without distillation.
    """

    def __init__(self, student, teacher, temperature=4.0, weight=0.5, from_logits=False, feature_weight=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.from_logits = bool(from_logits)
        self.feature_weight = float(feature_weight)
        self.feature_points = matching_layers(student, teacher) if self.feature_weight > 0 else []
        if self.feature_points:
            self._student_taps = tapped(student, self.feature_points)
            self._teacher_taps = tapped(teacher, self.feature_points)

    def call(self, inputs, training=None):
        """The student's outputs; in training, the distillation terms are added as losses (one
        pass of each network serves both)."""
        if not training or (self.weight == 0 and not self.feature_points):
            return self.student(inputs, training=training)
        if self.feature_points:
            student, *student_features = self._student_taps(inputs, training=training)
            teacher, *teacher_features = self._teacher_taps(inputs, training=False)
            self.add_loss(self.feature_weight * feature_loss(student_features, teacher_features))
        else:
            student, teacher = self.student(inputs, training=training), self.teacher(inputs, training=False)
        if self.weight > 0:
            self.add_loss(self.weight * self.distillation_loss(student, teacher))
        return student

    def _logits(self, outputs):
        outputs = ops.cast(outputs, "float32")
        return outputs if self.from_logits else ops.log(ops.clip(outputs, 1e-7, 1.0))

    def distillation_loss(self, student_outputs, teacher_outputs):
        t = self.temperature
        teacher_p = ops.softmax(self._logits(teacher_outputs) / t, axis=-1)
        student_logp = ops.log_softmax(self._logits(student_outputs) / t, axis=-1)
        teacher_logp = ops.log(ops.maximum(teacher_p, 1e-12))
        kl = ops.sum(teacher_p * (teacher_logp - student_logp), axis=-1)
        return ops.mean(kl) * (t * t)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # Keras adds the losses added in `call` (the distillation terms, regularisers) to the
        # cross-entropy; only the cross-entropy is scaled by (1 - weight).
        total = super().compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        if not training or self.weight == 0:
            return total
        added = ops.sum(ops.stack([ops.cast(loss, "float32") for loss in self.losses])) if self.losses else 0.0
        return (1.0 - self.weight) * (ops.cast(total, "float32") - added) + added
