"""One name per idea, the engine result's: a flag's and a latent's number in the SAE is ``latent`` (was
``Flag.latent_index``, ``Latent.index``); a latent's alignment with its own label is ``label_alignment``, as a
flag's is (was ``Latent.alignment``). Renames keep the data."""
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("audits", "0006_audit_sae_dataset"),
    ]

    operations = [
        migrations.RenameField(model_name="flag", old_name="latent_index", new_name="latent"),
        migrations.RenameField(model_name="latent", old_name="index", new_name="latent"),
        migrations.RenameField(model_name="latent", old_name="alignment", new_name="label_alignment"),
        migrations.AlterModelOptions(name="latent", options={"ordering": ["audit", "latent"]}),
        # the database's unique constraints follow a renamed column by themselves; only Django's record of them
        # names the fields, so only the record changes (no index of every latent row is rebuilt)
        migrations.SeparateDatabaseAndState(state_operations=[
            migrations.RemoveConstraint(model_name="flag", name="one_flag_per_latent_class_head"),
            migrations.AddConstraint(model_name="flag", constraint=models.UniqueConstraint(
                fields=("audit", "head", "class_name", "latent"), name="one_flag_per_latent_class_head")),
            migrations.RemoveConstraint(model_name="latent", name="one_row_per_latent"),
            migrations.AddConstraint(model_name="latent", constraint=models.UniqueConstraint(
                fields=("audit", "latent"), name="one_row_per_latent")),
        ]),
    ]
