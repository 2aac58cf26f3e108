from django.db import migrations, models
import django.db.models.deletion


class Migration(migrations.Migration):

    dependencies = [
        ('audits', '0005_harm_confirmation_label_confidence'),
        ('registry', '0002_dataset_metadata_columns_dataset_purpose'),
    ]

    operations = [
        migrations.AddField(
            model_name='audit',
            name='sae_dataset',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='sae_audits', to='registry.dataset'),
        ),
    ]
