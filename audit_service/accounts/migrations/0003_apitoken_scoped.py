from django.db import migrations, models


def mark_scoped(apps, schema_editor):
    # tokens created with projects before this field existed; a token whose projects were all deleted already
    # cannot be told from one created without any, so it stays unscoped
    ApiToken = apps.get_model("accounts", "ApiToken")
    ApiToken.objects.filter(projects__isnull=False).update(scoped=True)


class Migration(migrations.Migration):

    dependencies = [
        ("accounts", "0002_token_projects"),
    ]

    operations = [
        migrations.AddField(
            model_name="apitoken",
            name="scoped",
            field=models.BooleanField(default=False, help_text="limited to its projects (none once they are all "
                                                               "deleted); unticked: all of its user's projects"),
        ),
        migrations.RunPython(mark_scoped, migrations.RunPython.noop),
    ]
