from twisted.application.service import ServiceMaker

mailhub = ServiceMaker("mailhub", "mailhub.tap", "Mail continuity hub (SMTP MX, spool, archive)", "mailhub")
