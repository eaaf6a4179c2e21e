"""Stage orchestration, patient-level splits and ignite handlers."""
